"""``ichvol run --bucket DIR``: process a folder of exported studies with no services.

The folder's first-level subfolders are studies; the state (SQLite database, results) goes
to ``--state-dir``. The same code path as the services, in one process.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from worker.cli.segment import add_model_options
from worker.core.notices import DISCLAIMER
from worker.core.settings import Settings


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bucket", type=Path, required=True, help="folder whose first-level subfolders are studies")
    p.add_argument("--state-dir", type=Path, default=Path("ichvol-state"), help="SQLite database and results")
    p.add_argument("--quiet-period", type=float, default=0.0, help="seconds a study must be unchanged (default 0)")
    add_model_options(p)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from worker.core.errors import ConfigurationError
    from worker.model.engines import configured_segmenter
    from worker.overnight.local import format_table, local_settings, run_local

    if not args.bucket.is_dir():
        raise ConfigurationError(f"--bucket {args.bucket} is not a folder")
    local = local_settings(settings, bucket_dir=args.bucket, state_dir=args.state_dir, quiet_period_s=args.quiet_period)
    report, rows = run_local(local, segmenter=configured_segmenter(local, lazy=True))
    print(report.line())
    print(format_table(rows))
    print(f"database: {local.database_url}; artefacts: {local.results_bucket}")
    print(DISCLAIMER)
    return 0
