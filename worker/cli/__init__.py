"""The ``ichvol`` command line. Subcommands import what they need when they run.

Exit codes: 0 success; 2 unusable input (a study, a model file, a setting) with one
line on stderr and never a traceback; 1 an unexpected internal error.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from worker.core.errors import IchvolError
from worker.core.notices import DISCLAIMER
from worker.core.settings import Settings

log = logging.getLogger(__name__)

Handler = Callable[[argparse.Namespace, Settings], int]


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {}
    for name in ("model_path", "threshold", "min_component_ml", "inference_batch_size", "database_url"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    if getattr(args, "no_intracranial", False):
        overrides["restrict_to_intracranial"] = False
    return Settings.from_env(**overrides)


def _load_segmenter(settings: Settings):  # type: ignore[no-untyped-def]
    """The configured model: metadata now, TensorFlow and weights on first use."""
    from worker.model import framework
    from worker.model.engines import LazySegmenter

    framework.set_threads(settings.inference_threads)
    return LazySegmenter(
        settings.model_path,
        batch_size=settings.inference_batch_size,
        engine=settings.inference_engine,
        threads=settings.inference_threads,
    )


# --- segment -----------------------------------------------------------------------------


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", dest="model_path", help="weights file (.keras); default: ICHVOL_MODEL or the shipped one")
    p.add_argument("--batch-size", dest="inference_batch_size", type=int, help="slices per model call")


def _add_segment(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("segment", help="measure the hematoma in one DICOM study folder")
    p.add_argument("study_dir", type=Path, help="folder with the study's DICOM files (any nesting)")
    p.add_argument("--out", type=Path, required=True, help="output folder (created)")
    _add_model_options(p)
    p.add_argument("--threshold", type=float, help="probability threshold (default 0.5)")
    p.add_argument("--min-component-ml", type=float, help="remove components smaller than this (mL)")
    p.add_argument("--no-intracranial", action="store_true", help="do not restrict to the skull-enclosed space")
    p.set_defaults(handler=_segment)


def _segment(args: argparse.Namespace, settings: Settings) -> int:
    from worker.measure.pipeline import SegmentationOptions, segment_study

    segmenter = _load_segmenter(settings)
    outcome = segment_study(
        study_dir=args.study_dir,
        out_dir=args.out,
        segmenter=segmenter,
        options=SegmentationOptions.from_settings(settings),
    )
    if not outcome.ok:
        assert outcome.error is not None
        print(f"ichvol: {outcome.error.message} [{outcome.error.code.value}]", file=sys.stderr)
        return 2
    r = outcome.result
    print(
        f"hematoma volume {r['volume_ml']:.2f} mL (ABC/2 {r['abc2_ml']:.2f} mL), "
        f"{r['n_slices']} slices, series {r['series_instance_uid']}; outputs in {args.out}. {DISCLAIMER}"
    )
    return 0


# --- phantom -----------------------------------------------------------------------------


def _add_phantom(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from worker.cli.phantom import add_phantom_arguments

    p = sub.add_parser("phantom", help="write a synthetic head-CT study with known hematoma truth")
    add_phantom_arguments(p)
    p.set_defaults(handler=lambda args, settings: _run_phantom(args))


def _run_phantom(args: argparse.Namespace) -> int:
    from worker.cli.phantom import run_phantom_command

    return run_phantom_command(args)


# --- model info ----------------------------------------------------------------------------


def _add_model_info(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("model-info", help="print a weights file's metadata (no TensorFlow needed)")
    p.add_argument("--model", dest="model_path")
    p.set_defaults(handler=_model_info)


def _model_info(args: argparse.Namespace, settings: Settings) -> int:
    import json

    from worker.model.weights import read_model_info, resolve_model_path

    path, is_default = resolve_model_path(settings.model_path)
    info = read_model_info(path)
    data = {**info.to_json(), "sha256": info.sha256, "path": str(path), "default": is_default}
    print(json.dumps(data, indent=2))
    return 0


# --- embedded default: demo and run ----------------------------------------------------------


def _add_demo(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("demo", help="generate phantom studies and process them with no services (SQLite, folders)")
    p.add_argument("--dir", type=Path, default=Path("ichvol-demo"), help="working folder (default ./ichvol-demo)")
    p.add_argument("--studies", type=int, default=4, help="number of phantom studies (default 4)")
    p.add_argument("--seed", type=int, default=7)
    _add_model_options(p)
    p.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    import shutil

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
    report, rows = run_local(local, segmenter=_load_segmenter(local))
    print(report.line())
    print(format_table(rows, truth_ml=truth))
    print(f"database: {local.database_url}; artefacts: {local.results_bucket}")
    print(DISCLAIMER)
    return 0


def _add_run(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("run", help="process a folder of exported studies (one study per subfolder), no services")
    p.add_argument("--bucket", type=Path, required=True, help="folder whose first-level subfolders are studies")
    p.add_argument("--state-dir", type=Path, default=Path("ichvol-state"), help="SQLite database and results")
    p.add_argument("--quiet-period", type=float, default=0.0, help="seconds a study must be unchanged (default 0)")
    _add_model_options(p)
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace, settings: Settings) -> int:
    from worker.core.errors import ConfigurationError
    from worker.overnight.local import format_table, local_settings, run_local

    if not args.bucket.is_dir():
        raise ConfigurationError(f"--bucket {args.bucket} is not a folder")
    local = local_settings(settings, bucket_dir=args.bucket, state_dir=args.state_dir, quiet_period_s=args.quiet_period)
    report, rows = run_local(local, segmenter=_load_segmenter(local))
    print(report.line())
    print(format_table(rows))
    print(f"database: {local.database_url}; artefacts: {local.results_bucket}")
    print(DISCLAIMER)
    return 0


# --- services: scheduler and check -------------------------------------------------------------


def _add_scheduler(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from scheduler.main import add_scheduler_arguments

    p = sub.add_parser("scheduler", help="poll the export bucket and enqueue complete studies (loop)")
    add_scheduler_arguments(p)
    p.set_defaults(handler=_scheduler)


def _scheduler(args: argparse.Namespace, settings: Settings) -> int:
    from scheduler.main import run_from_args

    return run_from_args(args, settings)


def _add_check(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("check", help="exit 0 when the database, broker and buckets answer (health check)")
    p.add_argument("--db", action="store_true", help="check the database")
    p.add_argument("--broker", action="store_true", help="check the broker")
    p.add_argument("--s3", action="store_true", help="check the export and results buckets")
    p.set_defaults(handler=_check)


def _check(args: argparse.Namespace, settings: Settings) -> int:
    from worker.infra.health import run_checks

    wanted = [name for name in ("db", "broker", "s3") if getattr(args, name)] or ["db", "broker", "s3"]
    results = run_checks(settings, wanted)
    for name, (ok, detail) in results.items():
        print(f"{name}: {'ok' if ok else 'FAILED'} {detail}")
    return 0 if all(ok for ok, _ in results.values()) else 1


# --- commands that live in their own module ---------------------------------------------------


@dataclass(frozen=True)
class ModuleCommand:
    """A subcommand whose module provides ``add_<stem>_arguments`` and ``run_<stem>_command``.

    The module is imported when the parser is built (for its argument definitions); its
    heavy dependencies are imported only inside ``run_<stem>_command``.
    """

    name: str
    help: str
    module: str
    stem: str

    def register(self, sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
        module = importlib.import_module(self.module)
        parser = sub.add_parser(self.name, help=self.help)
        getattr(module, f"add_{self.stem}_arguments", getattr(module, "add_arguments", None))(parser)
        parser.set_defaults(handler=getattr(module, f"run_{self.stem}_command", getattr(module, "run", None)))


MODULE_COMMANDS = (
    ModuleCommand("train", "train DR-UNet (or UNet) with BCE + Dice and Adam", "worker.cli.train", "train"),
    ModuleCommand(
        "dataset",
        "labelled 2-D images or CT studies to sharded TFRecords, split by patient",
        "worker.cli.dataset",
        "dataset",
    ),
    ModuleCommand(
        "evaluate",
        "the paper's metrics and figures on studies with ground truth (HTML report)",
        "worker.cli.evaluate",
        "evaluate",
    ),
    ModuleCommand(
        "predict-images",
        "masks and overlays for windowed 8-bit slice images (PNG/JPEG)",
        "worker.cli.predict_images",
        "predict_images",
    ),
    ModuleCommand(
        "trends", "hematoma volume timelines and expansion (from the database)", "worker.cli.trends", "trends"
    ),
    ModuleCommand(
        "redeliver",
        "send stored results to the PACS again (failed, pending or missing)",
        "worker.cli.redeliver",
        "redeliver",
    ),
)


# --- PACS: the QIDO-RS source ------------------------------------------------------------------


def _add_pacs_poll(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("pacs-poll", help="copy new head CTs from a PACS (QIDO-RS/WADO-RS) into the export bucket")
    p.add_argument("--once", action="store_true", help="poll once, print the counts and exit")
    p.set_defaults(handler=_pacs_poll)


def _pacs_poll(args: argparse.Namespace, settings: Settings) -> int:
    from worker.delivery.pacs_source import run_pacs_poll

    return run_pacs_poll(settings, once=args.once)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [  # type: ignore[type-arg]
    _add_segment,
    _add_phantom,
    _add_demo,
    _add_run,
    _add_scheduler,
    _add_check,
    *(command.register for command in MODULE_COMMANDS),
    _add_model_info,
    _add_pacs_poll,
]


SERVICE_COMMANDS = {"scheduler", "train", "pacs-poll"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ichvol",
        description=f"Intracerebral hemorrhage volume on head CT with DR-UNet. {DISCLAIMER}",
    )
    parser.add_argument("--log-level", help="override ICHVOL_LOG_LEVEL")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = _settings(args)
        from worker.core.logs import configure_logging

        # Interactive commands print their own one-line summary; services log at the configured level.
        default_level = settings.log_level if args.command in SERVICE_COMMANDS else "WARNING"
        configure_logging(level=args.log_level or default_level, fmt=settings.log_format)
        handler: Handler = args.handler
        return handler(args, settings)
    except IchvolError as error:
        code = getattr(getattr(error, "code", None), "value", None)
        suffix = f" [{code}]" if code else ""
        print(f"ichvol: {error.message}{suffix}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ichvol: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
