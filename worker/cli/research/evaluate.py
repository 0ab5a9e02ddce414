"""``ichvol evaluate``: the command-line front of :mod:`worker.research.evaluation` (light to import)."""

from __future__ import annotations

import argparse
from pathlib import Path

from worker.cli import add_threshold_option
from worker.core.notices import DISCLAIMER
from worker.core.settings import Settings

METHODS = ("drunet", "unet", "abc2", "fcm", "active_contour")


def _labels(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected label numbers separated by commas, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("studies_dir", type=Path, metavar="STUDIES_DIR", help="folder of study folders with their truth")
    p.add_argument("--out", type=Path, required=True, help="new (or empty) report folder")
    p.add_argument(
        "--model", dest="model_path", help="DR-UNet weights (.keras); default: ICHVOL_MODEL or the shipped one"
    )
    p.add_argument("--unet-model", type=Path, help="UNet weights (.keras) for the UNet baseline")
    p.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated subset of {','.join(METHODS)} (default: all; unet only with --unet-model)",
    )
    p.add_argument("--labels", type=_labels, help="NIfTI label values / SEG segment numbers that are hematoma")
    p.add_argument("--batch-size", dest="inference_batch_size", type=int, help="slices per model call")
    add_threshold_option(p)
    p.add_argument("--min-component-ml", type=float, help="remove components smaller than this (mL)")
    p.add_argument("--no-intracranial", action="store_true", help="do not restrict to the skull-enclosed space")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from worker.measure.pipeline import SegmentationOptions
    from worker.model.engines import LazySegmenter, configured_segmenter
    from worker.research import metrics
    from worker.research.evaluation import DEFAULT_METHODS, evaluate

    if args.methods is None:
        methods = [m for m in DEFAULT_METHODS if m != "unet" or args.unet_model is not None]
    else:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    # The engine `segment` and the workers run (ICHVOL_INFERENCE_ENGINE), so that evaluated
    # numbers are the numbers users get; the report names the concrete engine.
    drunet = configured_segmenter(settings, lazy=True)
    unet = (
        LazySegmenter(
            args.unet_model,
            batch_size=settings.inference_batch_size,
            engine=settings.inference_engine,
            threads=settings.inference_threads,
        )
        if args.unet_model
        else None
    )
    result = evaluate(
        studies_dir=args.studies_dir,
        out_dir=args.out,
        drunet=drunet,
        unet=unet,
        methods=methods,
        options=SegmentationOptions.from_settings(settings),
        labels=args.labels,
        progress=True,
    )
    dice = metrics.summarize([c.results["drunet"].patient["dice"] for c in result.cases if c.truth_ml > 0])
    agreement = result.agreement["drunet"]
    print(
        f"evaluated {len(result.cases)} studies ({len(result.failures)} not evaluated): DR-UNet Dice per patient "
        f"{dice.text()}, volume RMSE {agreement.rmse_ml:.2f} mL; report in {result.files['html']}. {DISCLAIMER}"
    )
    return 0
