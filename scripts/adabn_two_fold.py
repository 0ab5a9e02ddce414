#!/usr/bin/env python
"""AdaBN measured on the masked real slices, two-fold: never adapted on the slices it scores.

Research use only, not for clinical use.

The 14 real slices (13 with reference masks) are split in two folds (alternating in
file-name order). For each fold, a copy of the model gets its BatchNorm statistics
recomputed (:func:`worker.research.training.recalibrate_batchnorm`) over the *other*
fold's slices, prepared exactly as ``ichvol predict-images`` prepares them, and is scored
on this fold through the image path (:func:`worker.research.image_yardstick.score_pairs`).
The unadapted model is scored on the same folds. Prints both means.

    .venv/bin/python scripts/adabn_two_fold.py [--model M.keras]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="weights file (default: the shipped model)")
    args = parser.parse_args(argv)

    from worker.imaging.slice_calibration import calibrate_image
    from worker.measure.image_inference import ImageOptions
    from worker.model import preprocess
    from worker.model.engines import KerasSegmenter
    from worker.model.networks import load_keras_model
    from worker.model.weights import read_model_info, resolve_model_path
    from worker.research.image_yardstick import load_reference_pairs, score_pairs
    from worker.research.training import recalibrate_batchnorm

    pairs = load_reference_pairs(DATA / "drunet-test-slices", DATA / "drunet-test-slices-masks")
    path, _ = resolve_model_path(args.model)
    info = read_model_info(path)
    folds = [pairs[0::2], pairs[1::2]]
    options = ImageOptions()
    rows = []
    for k, fold in enumerate(folds):
        other = folds[1 - k]
        inputs = []
        for pair in other:
            cal = calibrate_image(pair.image, model_window=info.hu_window)
            x, _ = preprocess.to_model_input(cal.to_hu(pair.image)[None], size=info.input_size, window=info.hu_window)
            inputs.append(x)
        batch = np.concatenate(inputs)[..., None]
        plain = KerasSegmenter(load_keras_model(path), info)
        adapted_model = load_keras_model(path)
        recalibrate_batchnorm(adapted_model, [batch])
        adapted = KerasSegmenter(adapted_model, info)
        before, _ = score_pairs(fold, segmenter=plain, options=options)
        after, _ = score_pairs(fold, segmenter=adapted, options=options)
        for b, a in zip(before.slices, after.slices, strict=True):
            if b.scored:
                rows.append((b.name, k, b.dice, a.dice, b.dice_model, a.dice_model))
                alone = f"model alone {b.dice_model:.3f} -> {a.dice_model:.3f}"
                print(f"fold {k} {b.name}: Dice {b.dice:.3f} -> {a.dice:.3f} ({alone})")
    before_dice = np.mean([r[2] for r in rows])
    after_dice = np.mean([r[3] for r in rows])
    print(
        f"{info.version}: mean Dice {before_dice:.3f} -> {after_dice:.3f} with AdaBN (two-fold, {len(rows)} slices); "
        f"model alone {np.mean([r[4] for r in rows]):.3f} -> {np.mean([r[5] for r in rows]):.3f}; found "
        f"{sum(r[2] > 0.1 for r in rows)} -> {sum(r[3] > 0.1 for r in rows)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
