"""``ichvol demo``: phantom studies processed with no services (SQLite, local folders).

The working folder's bucket, results, database and scratch space are replaced on each run;
the table compares each study's measured volume with the phantom's truth.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from worker.cli.segment import add_model_options
from worker.core.notices import DISCLAIMER
from worker.core.settings import Settings


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", type=Path, default=Path("ichvol-demo"), help="working folder (default ./ichvol-demo)")
    p.add_argument("--studies", type=int, default=4, help="number of phantom studies (default 4)")
    p.add_argument("--seed", type=int, default=7)
    add_model_options(p)


def run(args: argparse.Namespace, settings: Settings) -> int:
    import shutil

    from worker.model.engines import configured_segmenter
    from worker.overnight.local import format_table, local_settings, run_local
    from worker.synth.demo import make_demo_bucket

    root = args.dir.resolve()
    bucket = root / "bucket"
    if bucket.exists():
        shutil.rmtree(bucket)
    for stale in ("results", "ichvol.db", "scratch"):
        target = root / stale
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    truth = make_demo_bucket(bucket, n=args.studies, seed=args.seed)
    local = local_settings(settings, bucket_dir=bucket, state_dir=root, quiet_period_s=0.0)
    report, rows = run_local(local, segmenter=configured_segmenter(local, lazy=True))
    print(report.line())
    print(format_table(rows, truth_ml=truth))
    print(f"database: {local.database_url}; artefacts: {local.results_bucket}")
    print(DISCLAIMER)
    return 0
