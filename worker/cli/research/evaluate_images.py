"""``ichvol evaluate-images IMAGES MASKS --out DIR``: the real-image yardstick (:mod:`worker.research.image_yardstick`).

Scores the configured model (weights, engine, post-processing: the same as ``ichvol
predict-images``) on 8-bit slice images against reference masks of the same file names.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from worker.cli import add_threshold_option
from worker.cli.predict_images import add_image_options, image_options
from worker.core.notices import DISCLAIMER
from worker.core.settings import Settings


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", type=Path, metavar="IMAGES", help="folder of windowed 8-bit slice images")
    p.add_argument("masks", type=Path, metavar="MASKS", help="folder of reference masks (same file names)")
    p.add_argument("--out", type=Path, required=True, help="output folder: yardstick.csv/.json, contact_sheet.png")
    p.add_argument("--model", dest="model_path", help="weights file (.keras); default: ICHVOL_MODEL or the shipped one")
    p.add_argument("--batch-size", dest="inference_batch_size", type=int, help="images per model call")
    add_threshold_option(p)
    add_image_options(p)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from worker.model.engines import configured_segmenter
    from worker.research.image_yardstick import FOUND_DICE, evaluate_images

    options = image_options(args, settings)
    segmenter = configured_segmenter(settings, lazy=True)
    result = evaluate_images(
        images_dir=args.images, masks_dir=args.masks, out_dir=args.out, segmenter=segmenter, options=options
    )
    summary = result.summary()
    for score in result.slices:
        if score.scored:
            verdict = "found" if score.found else "MISSED"
            print(
                f"{score.name}: Dice {score.dice:.3f} (model alone {score.dice_model:.3f}), sensitivity "
                f"{score.sensitivity:.3f}, precision {score.precision:.3f}, {verdict}"
            )
        else:
            print(f"{score.name}: no reference mask, not scored")
    print(
        f"mean Dice {summary['real_dice']:.3f} over {len(result.scored)} slices, found {result.n_found} of "
        f"{len(result.scored)} (Dice > {FOUND_DICE}); contact sheet and reports in {args.out}. {DISCLAIMER}"
    )
    return 0
