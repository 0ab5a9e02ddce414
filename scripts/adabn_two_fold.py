#!/usr/bin/env python
"""AdaBN measured on the masked real slices, two-fold: never adapted on the slices it scores.

Research use only, not for clinical use.

The 14 real slices (13 with reference masks) are split in two folds (alternating in
file-name order). For each fold, a copy of the model gets its BatchNorm statistics
recomputed (:func:`worker.research.training.recalibrate_batchnorm`) over the *other*
fold's slices, prepared exactly as ``ichvol predict-images`` prepares them, and is scored
on this fold through the image path (:func:`worker.research.image_yardstick.score_pairs`).
With ``--site-share`` below 1 the recomputed statistics are mixed with the model's own
(:func:`worker.research.adaptation.blend_batchnorm_statistics`), as ``ichvol adapt
--site-share`` does. The unadapted model is scored on the same folds. Prints both means.

    .venv/bin/python scripts/adabn_two_fold.py [--model M.keras] [--site-share 1,0.5,0.25]
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
    parser.add_argument("--site-share", default="1", help="comma-separated site shares to measure (1: plain AdaBN)")
    parser.add_argument(
        "--layers", default="all", help="comma-separated numbers of leading BatchNorm layers adapted (default all)"
    )
    args = parser.parse_args(argv)
    layer_counts = [None if v == "all" else int(v) for v in args.layers.split(",")]
    shares = [(float(v), n) for v in args.site_share.split(",") for n in layer_counts]

    from worker.measure.image_inference import ImageOptions, model_input
    from worker.model.engines import KerasSegmenter
    from worker.model.networks import load_keras_model
    from worker.model.weights import read_model_info, resolve_model_path
    from worker.research.adaptation import batchnorm_statistics, blend_batchnorm_statistics
    from worker.research.image_yardstick import load_reference_pairs, score_pairs
    from worker.research.training import recalibrate_batchnorm

    pairs = load_reference_pairs(DATA / "drunet-test-slices", DATA / "drunet-test-slices-masks")
    path, _ = resolve_model_path(args.model)
    info = read_model_info(path)
    folds = [pairs[0::2], pairs[1::2]]
    options = ImageOptions()
    rows: dict[tuple[float, int | None], list[tuple[str, int, float, float, float, float]]] = {s: [] for s in shares}
    plain = KerasSegmenter(load_keras_model(path), info)
    for k, fold in enumerate(folds):
        other = folds[1 - k]
        batch = np.concatenate([model_input(pair.image, info=info, options=options)[2] for pair in other])[..., None]
        before, _ = score_pairs(fold, segmenter=plain, options=options)
        for share, n_layers in shares:
            adapted_model = load_keras_model(path)
            source = batchnorm_statistics(adapted_model)
            recalibrate_batchnorm(adapted_model, [batch])
            if share < 1.0 or n_layers is not None:
                blend_batchnorm_statistics(adapted_model, source, share, layers=n_layers)
            after, _ = score_pairs(fold, segmenter=KerasSegmenter(adapted_model, info), options=options)
            for b, a in zip(before.slices, after.slices, strict=True):
                if b.scored:
                    rows[share, n_layers].append((b.name, k, b.dice, a.dice, b.dice_model, a.dice_model))
                    alone = f"model alone {b.dice_model:.3f} -> {a.dice_model:.3f}"
                    where = f"share {share:g} layers {n_layers or 'all'} fold {k} {b.name}"
                    print(f"{where}: Dice {b.dice:.3f} -> {a.dice:.3f} ({alone})")
    for (share, n_layers), got in rows.items():
        print(
            f"{info.version}, site share {share:g}, BatchNorm layers adapted {n_layers or 'all'}: "
            f"mean Dice {np.mean([r[2] for r in got]):.3f} -> "
            f"{np.mean([r[3] for r in got]):.3f} with AdaBN (two-fold, {len(got)} slices); model alone "
            f"{np.mean([r[4] for r in got]):.3f} -> {np.mean([r[5] for r in got]):.3f}; found "
            f"{sum(r[2] > 0.1 for r in got)} -> {sum(r[3] > 0.1 for r in got)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
