#!/usr/bin/env python
"""Self-training measured on the masked real slices, two-fold: never trained on the slices it scores.

Research use only, not for clinical use.

For each fold of the 14 real slices (alternating in file-name order, as
``scripts/adabn_two_fold.py``): the model's own final masks on the *other* fold (the image
path of ``ichvol predict-images``: threshold, intracranial restriction, seeded growth) become
pseudo-labels; a copy of the model is fine-tuned on those slices (prepared exactly as the
image path prepares them) mixed with the synthetic bank at ``--synthetic-share``, with the
loss and optimiser of ``ichvol adapt --teacher`` (:func:`worker.research.distillation.fine_tune`),
optionally followed by AdaBN; then scored on this fold. The unadapted model is scored on the
same folds. No reference mask is ever used for training, only for the score.

    .venv/bin/python scripts/self_training_two_fold.py [--model M.keras] [--steps 60] \\
        [--background-ct ../shared/data/real-head-ct-ge] [--cache DIR]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="weights file (default: the shipped model)")
    parser.add_argument("--steps", default="60", help="comma-separated fine-tuning steps to measure (batch 8)")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--synthetic-share", type=float, default=0.5)
    parser.add_argument("--synthetic-samples", type=int, default=2000)
    parser.add_argument("--background-ct", type=Path, default=DATA / "real-head-ct-ge")
    parser.add_argument("--cache", type=Path, default=Path("self-training-cache"), help="where the bank is kept")
    parser.add_argument("--adabn", action="store_true", help="recompute BatchNorm statistics after fine-tuning")
    parser.add_argument("--freeze-batchnorm", action="store_true", help="BatchNorm statistics fixed while fine-tuning")
    args = parser.parse_args(argv)

    from worker.measure.image_inference import ImageOptions, model_input
    from worker.model import preprocess
    from worker.model.engines import KerasSegmenter
    from worker.model.networks import load_keras_model
    from worker.model.weights import read_model_info, resolve_model_path
    from worker.research.adaptation import adabn_batches
    from worker.research.distillation import DistillConfig, fine_tune, synthetic_bank
    from worker.research.image_yardstick import load_reference_pairs, score_pairs
    from worker.research.training import recalibrate_batchnorm

    pairs = load_reference_pairs(DATA / "drunet-test-slices", DATA / "drunet-test-slices-masks")
    path, _ = resolve_model_path(args.model)
    info = read_model_info(path)
    folds = [pairs[0::2], pairs[1::2]]
    options = ImageOptions()
    plain = KerasSegmenter(load_keras_model(path), info)
    all_steps = [int(v) for v in args.steps.split(",")]
    base_config = DistillConfig(
        studies_dir=Path("."),
        out_path=Path("unused.keras"),
        teacher=None,  # type: ignore[arg-type]  # fine_tune and the bank never call it
        cache_dir=args.cache,
        learning_rate=args.learning_rate,
        synthetic_share=args.synthetic_share,
        synthetic_samples=args.synthetic_samples,
        background_ct=args.background_ct,
        epochs=1,
        freeze_batchnorm=args.freeze_batchnorm,
    )
    bank = synthetic_bank(base_config, info)
    rows: dict[int, list[tuple[float, float, float, float]]] = {s: [] for s in all_steps}
    for k, fold in enumerate(folds):
        other = folds[1 - k]
        _, pseudo = score_pairs(other, segmenter=plain, options=options)
        images, targets = [], []
        for pair, mask in zip(other, pseudo, strict=True):
            _, _, x, fit = model_input(pair.image, info=info, options=options)
            images.append(x)
            targets.append(preprocess.soft_to_model((mask > 0).astype(np.float32)[None], fit))
        x_site, y_site = np.concatenate(images), np.concatenate(targets)
        before, _ = score_pairs(fold, segmenter=plain, options=options)
        for steps in all_steps:
            model = load_keras_model(path)
            config = replace(base_config, steps_per_epoch=steps)
            fine_tune(model, images=x_site, targets=y_site, bank=bank, config=config)
            if args.adabn:
                recalibrate_batchnorm(model, adabn_batches(x_site, seed=0))
            after, _ = score_pairs(fold, segmenter=KerasSegmenter(model, info), options=options)
            for b, a in zip(before.slices, after.slices, strict=True):
                if b.scored:
                    assert b.dice is not None and a.dice is not None
                    assert b.dice_model is not None and a.dice_model is not None
                    rows[steps].append((b.dice, a.dice, b.dice_model, a.dice_model))
                    print(f"steps {steps} fold {k} {b.name}: Dice {b.dice:.3f} -> {a.dice:.3f}", flush=True)
    how = (", AdaBN" if args.adabn else "") + (", BN frozen" if args.freeze_batchnorm else "")
    for steps, got in rows.items():
        r = np.asarray(got)
        print(
            f"{info.version}, self-training {steps} steps (lr {args.learning_rate:g}, synthetic share "
            f"{args.synthetic_share:g}{how}): mean Dice {r[:, 0].mean():.3f} -> "
            f"{r[:, 1].mean():.3f} (two-fold, {len(r)} slices); model alone {r[:, 2].mean():.3f} -> "
            f"{r[:, 3].mean():.3f}; found {(r[:, 0] > 0.1).sum()} -> {(r[:, 1] > 0.1).sum()}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
