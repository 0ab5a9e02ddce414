#!/usr/bin/env python
"""Teacher, base and distilled DR-UNet against phantom truth: the three-way table of the model card.

Research use only, not for clinical use.

For every phantom study in STUDIES (one per subfolder, each with its ``truth/truth_mask.npz``
as ``ichvol phantom`` writes it): the teacher's mask (hemorrhage probability >= 0.5) read from
the label cache ``ichvol adapt --teacher blast-ct`` filled (LABELS, one teacher), and each
``--model NAME=WEIGHTS.keras`` through the post-processing of ``ichvol segment`` (the
configured defaults: threshold 0.5, intracranial restriction, seeded growth). Prints Dice
and volume (mL) against the truth per study and their means, as a Markdown table.

    .venv/bin/python scripts/distillation_phantoms.py STUDIES LABELS \\
        --model base=worker/weights/drunet_default.keras --model distilled=out/distilled.keras
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("studies", type=Path)
    parser.add_argument("labels", type=Path, help="the teacher-label cache folder")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=WEIGHTS", help="a model to score")
    args = parser.parse_args(argv)

    from worker.imaging.dicom_load import load_study
    from worker.measure import volume
    from worker.measure.pipeline import SegmentationOptions, final_mask
    from worker.model import preprocess
    from worker.model.networks import load_keras_model
    from worker.model.weights import read_model_info
    from worker.research.adaptation import study_folders
    from worker.research.distillation import TEACHER_THRESHOLD, keras_predictor, mask_dice
    from worker.research.teacher_labels import read_label

    options = SegmentationOptions()
    models = {}
    for item in args.model:
        name, _, path = item.partition("=")
        models[name] = (read_model_info(Path(path)), keras_predictor(load_keras_model(Path(path))))
    columns = ["teacher", *models]
    print("| study | truth mL | " + " | ".join(f"{c} Dice | {c} mL" for c in columns) + " |")
    print("|---" * (2 + 2 * len(columns)) + "|")
    sums: dict[str, list[float]] = {c: [] for c in columns}
    for study in study_folders(args.studies):
        cached = sorted(args.labels.glob(f"{study.name}-*.npz"))
        truth_file = study / "truth" / "truth_mask.npz"
        if not cached or not truth_file.is_file():
            print(f"skipped {study.name}: no teacher label or no truth", file=sys.stderr)
            continue
        series = load_study(study, rules=options.rules)
        with np.load(truth_file) as data:
            index = {str(uid): k for k, uid in enumerate(data["sop_instance_uids"])}
            truth = data["mask"][[index[s.sop_instance_uid] for s in series.slices]]
        geometry = {"pixel_spacing_mm": series.pixel_spacing_mm, "slab_thickness_mm": series.slab_thickness_mm}
        masks = {"teacher": (read_label(cached[0]).hemorrhage >= TEACHER_THRESHOLD).astype(np.uint8)}
        for name, (info, predict) in models.items():
            x, fit = preprocess.to_model_input(series.hu, size=info.input_size, window=info.hu_window)
            masks[name] = final_mask(preprocess.to_native(predict(x), fit), series, options.for_model(info))
        cells = []
        for name in columns:
            dice = mask_dice(masks[name], truth)
            sums[name].append(dice)
            cells.append(f"{dice:.2f} | {volume.planimetric_volume_ml(masks[name], **geometry):.1f}")  # type: ignore[arg-type]
        truth_ml = volume.planimetric_volume_ml(truth, **geometry)  # type: ignore[arg-type]
        print(f"| {study.name} | {truth_ml:.1f} | " + " | ".join(cells) + " |")
    print("| mean Dice | | " + " | ".join(f"{np.mean(sums[c]):.2f} | " for c in columns) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
