"""Benchmark: one scheduler poll over a large export bucket (not a test).

    .venv/bin/python benchmarks/scheduler_bench.py                     # 100,000 objects, local PostgreSQL
    .venv/bin/python benchmarks/scheduler_bench.py --objects 20000 --per-study 50
    .venv/bin/python benchmarks/scheduler_bench.py --s3                # also against SeaweedFS on loopback

It writes ``--objects`` empty files as ``--objects / --per-study`` study folders (each
with a ``_COMPLETE`` marker) into a temporary folder used as the bucket (LocalStore), and
optionally uploads them to a SeaweedFS bucket, creates a throwaway PostgreSQL database
(``ichvol_bench_<pid>``), migrates it, and times with the production ``poll_once``:

* the first poll (lists everything, registers every study version and run, "sends" them);
* a second poll over the unchanged bucket (lists everything, registers nothing);

and counts the SQL statements each poll executed: a constant handful, whatever the
number of objects or studies (no per-object or per-study round trip). Prints the median
of ``--repeat`` repetitions of the second poll.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import event

from worker.core.settings import Settings
from worker.infra import db
from worker.infra.intake import poll_once
from worker.infra.storage import LocalStore
from worker.model.weights import ModelInfo

MODEL = ModelInfo(
    name="DR-UNet",
    architecture="drunet",
    dims=8,
    input_size=128,
    hu_window=(-20, 100),
    version="bench",
    sha256="0" * 64,
)


def make_bucket(root: Path, *, objects: int, per_study: int) -> int:
    n_studies = max(1, objects // per_study)
    for s in range(n_studies):
        folder = root / f"STUDY{s:06d}" / "DICOM"
        folder.mkdir(parents=True)
        for i in range(per_study - 1):
            (folder / f"IM{i:05d}.dcm").write_bytes(b"")
        (root / f"STUDY{s:06d}" / "_COMPLETE").write_bytes(b"")
    return n_studies


def timed_poll(store: object, sessions: object, settings: Settings, engine: object) -> tuple[float, int, object]:
    statements = 0

    def count(*_: object) -> None:
        nonlocal statements
        statements += 1

    event.listen(engine, "before_cursor_execute", count)
    sent: list[int] = []
    started = time.perf_counter()
    report = poll_once(
        store=store, sessions=sessions, settings=settings, model=MODEL, enqueue=lambda run_id, _t: sent.append(run_id)
    )
    seconds = time.perf_counter() - started
    event.remove(engine, "before_cursor_execute", count)
    return seconds, statements, report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=100_000)
    parser.add_argument("--per-study", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--admin-url", default="postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()

    import psycopg2
    from sqlalchemy.engine import make_url

    admin = make_url(args.admin_url)
    name = f"ichvol_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    conn = psycopg2.connect(host=admin.host, port=admin.port, user=admin.username, dbname=admin.database)
    conn.autocommit = True
    conn.cursor().execute(f'CREATE DATABASE "{name}"')
    url = str(admin.set(database=name).render_as_string(hide_password=False))
    try:
        db.upgrade_to_head(url)
        engine = db.make_engine(url)
        sessions = db.session_factory(engine)
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            n_studies = make_bucket(Path(tmp), objects=args.objects, per_study=args.per_study)
            seconds = time.perf_counter() - started
            print(f"bucket: {args.objects} objects in {n_studies} studies written in {seconds:.1f} s")
            settings = Settings.from_env({}).replace(
                database_url=url, export_bucket=tmp, export_prefix="", quiet_period_s=0.0
            )
            store = LocalStore(Path(tmp))
            first_s, first_sql, first = timed_poll(store, sessions, settings, engine)
            print(f"first poll:  {first_s:6.2f} s, {first_sql} SQL statements -- {first.line()}")  # type: ignore[attr-defined]
            seconds, counts = [], []
            for _ in range(args.repeat):
                s, n, report = timed_poll(store, sessions, settings, engine)
                seconds.append(s)
                counts.append(n)
            print(
                f"second poll: {statistics.median(seconds):6.2f} s median of {args.repeat} "
                f"(min {min(seconds):.2f}, max {max(seconds):.2f}), {max(counts)} SQL statements -- {report.line()}"  # type: ignore[attr-defined]
            )
            print(f"machine load: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} CPUs")
        engine.dispose()
    finally:
        conn.cursor().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
