"""``ichvol predict-images``: the command-line front of :mod:`worker.measure.predict_images` (light to import)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from worker.cli import add_threshold_option, hu_window
from worker.core.notices import DISCLAIMER
from worker.core.settings import Settings

if TYPE_CHECKING:
    from worker.measure.image_inference import ImageOptions


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
    add_threshold_option(p)
    p.add_argument("--pixel-spacing", type=_spacing, metavar="MM[,MM]", help="of these images' pixels: areas in mm2")
    p.add_argument("--slice-thickness", type=float, metavar="MM", help="with --pixel-spacing: volumes in mL")
    add_image_options(p)


def add_image_options(p: argparse.ArgumentParser) -> None:
    """How 8-bit images become HU and are post-processed (``predict-images``, ``evaluate-images``)."""
    p.add_argument(
        "--calibration",
        choices=["parenchyma", "window", "none"],
        default=None,
        help="how grey levels become HU: parenchyma (default: the brain read as 33 HU, the model's window width), "
        "window (--display-window), none (levels span the model's own window, the seed's convention)",
    )
    p.add_argument(
        "--display-window",
        type=hu_window,
        metavar="LOW,HIGH",
        help="the HU the images' levels 0 and 255 stand for, when the export window is known (implies "
        "--calibration window); e.g. 0,80 for W80/L40",
    )
    p.add_argument("--no-intracranial", action="store_true", help="do not restrict to the skull ring's inside")
    p.add_argument("--no-growth", action="store_true", help="no seeded growth into the blood-density region")


def image_options(args: argparse.Namespace, settings: Settings) -> ImageOptions:
    """The :class:`ImageOptions` the command line and the settings ask for."""
    from worker.measure.image_inference import ImageOptions
    from worker.measure.pipeline import growth_settings

    calibration = args.calibration or ("window" if args.display_window is not None else "parenchyma")
    if calibration == "window" and args.display_window is None:
        from worker.core.errors import ConfigurationError

        raise ConfigurationError("--calibration window needs --display-window LOW,HIGH")
    return ImageOptions(
        threshold=settings.threshold,
        calibration=calibration,
        display_window=args.display_window,
        intracranial=not args.no_intracranial,
        growth=growth_settings(settings),
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    import sys

    from worker.core.errors import ConfigurationError
    from worker.measure.predict_images import predict_images
    from worker.model.engines import configured_segmenter

    if args.slice_thickness is not None and args.pixel_spacing is None:
        raise ConfigurationError("--slice-thickness needs --pixel-spacing (a volume needs both)")
    options = image_options(args, settings)
    # The engine and settings of `ichvol segment` and the workers: evaluated numbers are the numbers users get.
    segmenter = configured_segmenter(settings, lazy=True)
    result = predict_images(
        in_dir=args.in_dir,
        out_dir=args.out_dir,
        segmenter=segmenter,
        threshold=settings.threshold,
        batch_size=settings.inference_batch_size,
        pixel_spacing_mm=args.pixel_spacing,
        slice_thickness_mm=args.slice_thickness,
        progress=True,
        options=options,
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
