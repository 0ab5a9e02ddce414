"""The ``ichvol`` command line: one module per command, each with ``add_arguments`` and ``run``.

``worker/cli/<command>.py`` (``predict-images`` is ``predict_images.py``; the commands that make
and score models in ``worker/cli/research/``) defines
``add_arguments(parser)`` and ``run(args, settings) -> int``; :data:`COMMANDS` lists them
with their one-line help, in the order ``ichvol --help`` shows. A command module is imported when the parser is
built, so it imports only light modules at the top and the rest inside ``run``. Only this
package parses arguments; it may import every room. Read :mod:`worker.cli.segment` first.

Exit codes: 0 success; 2 unusable input (a study, a model file, a setting) with one
line on stderr and never a traceback; 1 an unexpected internal error.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from worker.core.errors import IchvolError
from worker.core.notices import DISCLAIMER
from worker.core.settings import Settings

Handler = Callable[[argparse.Namespace, Settings], int]

#: The commands and their one-line help, in the order of ``ichvol --help``.
COMMANDS = {
    "segment": "measure the hematoma in one DICOM study folder",
    "phantom": "write a synthetic head-CT study with known hematoma truth",
    "demo": "generate phantom studies and process them with no services (SQLite, folders)",
    "run": "process a folder of exported studies (one study per subfolder), no services",
    "scheduler": "poll the export bucket and enqueue complete studies (loop)",
    "check": "exit 0 when the database, broker and buckets answer (health check)",
    "train": "train DR-UNet (or UNet) with BCE + Dice and Adam",
    "dataset": "labelled 2-D images or CT studies to sharded TFRecords, split by patient",
    "evaluate": "the paper's metrics and figures on studies with ground truth (HTML report)",
    "predict-images": "masks and overlays for windowed 8-bit slice images (PNG/JPEG)",
    "evaluate-images": "score a model on 8-bit slice images against reference masks (the real-image yardstick)",
    "adapt": "adapt a model to a site's own unlabelled studies (AdaBN; --teacher blast-ct: distillation)",
    "teacher": "the BLAST-CT teacher (4 lesion classes) on one study: segment's outputs, per-class volumes",
    "trends": "hematoma volume timelines and expansion (from the database)",
    "redeliver": "send stored results to the PACS again (failed, pending or missing)",
    "model-info": "print a weights file's metadata (no TensorFlow needed)",
    "pacs-poll": "copy new head CTs from a PACS (QIDO-RS/WADO-RS) into the export bucket",
}

#: Commands that make and score models: modules in ``worker/cli/research/``.
RESEARCH_COMMANDS = {"phantom", "train", "dataset", "evaluate", "evaluate-images", "adapt", "teacher"}

#: Services log at the configured level; interactive commands print their own summary.
SERVICE_COMMANDS = {"scheduler", "train", "pacs-poll"}


def hu_window(text: str) -> tuple[float, float]:
    """An argparse type for ``LOW,HIGH`` in HU (e.g. ``0,80``): the two ends, HIGH above LOW."""
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH in HU, got {text!r}") from None
    if not high > low:
        raise argparse.ArgumentTypeError(f"the window's high end must be above its low end, got {text!r}")
    return low, high


def add_threshold_option(p: argparse.ArgumentParser) -> None:
    """``--threshold P``: the decision threshold, overriding the one calibrated for the model."""
    p.add_argument(
        "--threshold", type=float, help="probability threshold (default: the model's calibrated one, in its metadata)"
    )


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {}
    for name in ("model_path", "threshold", "min_component_ml", "inference_batch_size", "database_url"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    if getattr(args, "no_intracranial", False):
        overrides["restrict_to_intracranial"] = False
    if getattr(args, "no_growth", False):
        overrides["growth"] = False
    return Settings.from_env(**overrides)


def command_module(name: str) -> str:
    """The module that implements the command ``name`` (``predict-images`` -> ``worker.cli.predict_images``)."""
    room = "worker.cli.research" if name in RESEARCH_COMMANDS else "worker.cli"
    return f"{room}.{name.replace('-', '_')}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ichvol",
        description=f"Intracerebral hemorrhage volume on head CT with DR-UNet. {DISCLAIMER}",
    )
    parser.add_argument("--log-level", help="override ICHVOL_LOG_LEVEL")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        command = importlib.import_module(command_module(name))
        command_parser = sub.add_parser(name, help=help_text)
        command.add_arguments(command_parser)
        command_parser.set_defaults(handler=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = _settings(args)
        from worker.core.logs import configure_logging, route_warnings

        # Interactive commands print their own one-line summary; services log at the configured level.
        default_level = settings.log_level if args.command in SERVICE_COMMANDS else "WARNING"
        configure_logging(level=args.log_level or default_level, fmt=settings.log_format)
        route_warnings()  # a library's warnings become INFO log lines, not stderr after the summary
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
