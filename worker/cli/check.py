"""``ichvol check``: exit 0 when the database, the broker and the buckets answer (readiness probe)."""

from __future__ import annotations

import argparse

from worker.core.settings import Settings


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", action="store_true", help="check the database")
    p.add_argument("--broker", action="store_true", help="check the broker")
    p.add_argument("--s3", action="store_true", help="check the export and results buckets")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from worker.infra.health import run_checks

    wanted = [name for name in ("db", "broker", "s3") if getattr(args, name)] or ["db", "broker", "s3"]
    results = run_checks(settings, wanted)
    for name, (ok, detail) in results.items():
        print(f"{name}: {'ok' if ok else 'FAILED'} {detail}")
    return 0 if all(ok for ok, _ in results.values()) else 1
