"""``ichvol predict-images``: the command-line front of :mod:`worker.measure.predict_images` (light to import)."""

from __future__ import annotations

import argparse
from pathlib import Path

from worker.core.notices import DISCLAIMER
from worker.core.settings import Settings


def _spacing(text: str) -> tuple[float, float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MM or ROW_MM,COL_MM, got {text!r}") from None
    if len(values) == 1:
        return values[0], values[0]
    if len(values) == 2:
        return values[0], values[1]
    raise argparse.ArgumentTypeError(f"expected MM or ROW_MM,COL_MM, got {text!r}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("in_dir", type=Path, metavar="IN_DIR", help="folder of windowed 8-bit slice images")
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="output folder (created)")
    p.add_argument("--model", dest="model_path", help="weights file (.keras); default: ICHVOL_MODEL or the shipped one")
    p.add_argument("--batch-size", dest="inference_batch_size", type=int, help="images per model call")
    p.add_argument("--threshold", type=float, help="probability threshold (default 0.5)")
    p.add_argument("--pixel-spacing", type=_spacing, metavar="MM[,MM]", help="of these images' pixels: areas in mm2")
    p.add_argument("--slice-thickness", type=float, metavar="MM", help="with --pixel-spacing: volumes in mL")


def run(args: argparse.Namespace, settings: Settings) -> int:
    import sys

    from worker.core.errors import ConfigurationError
    from worker.measure.predict_images import predict_images
    from worker.model import framework
    from worker.model.engines import LazySegmenter

    if args.slice_thickness is not None and args.pixel_spacing is None:
        raise ConfigurationError("--slice-thickness needs --pixel-spacing (a volume needs both)")
    framework.set_threads(settings.inference_threads)
    segmenter = LazySegmenter(settings.model_path, batch_size=settings.inference_batch_size)
    result = predict_images(
        in_dir=args.in_dir,
        out_dir=args.out_dir,
        segmenter=segmenter,
        threshold=settings.threshold,
        batch_size=settings.inference_batch_size,
        pixel_spacing_mm=args.pixel_spacing,
        slice_thickness_mm=args.slice_thickness,
        progress=True,
    )
    volume = "" if result.total_volume_ml is None else f", total volume {result.total_volume_ml:.2f} mL"
    print(
        f"segmented {result.n_ok} images ({result.n_failed} failed){volume}; masks, overlays and areas.csv in "
        f"{result.out_dir}. {DISCLAIMER}"
    )
    for r in result.images:
        if r.status == "failed":
            print(f"ichvol: {r.file}: {r.reason}", file=sys.stderr)
    return 2 if result.n_failed else 0
