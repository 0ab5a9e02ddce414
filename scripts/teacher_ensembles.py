#!/usr/bin/env python
"""BLAST-CT: each model alone, and ensembles of the first 1, 3 and 12, against the ensemble of all.

Research use only, not for clinical use.

Converts nothing: WEIGHTS is a folder of converted models with its ``manifest.json``
(``scripts/convert_blast_ct.py ../shared/data/blast-ct-models OUT --models model_1 ... model_12``,
no torch needed). For each study: every model through ``ichvol teacher``'s path
(:func:`worker.measure.teacher.predict_teacher`, engine ``auto``); an ensemble is the mean of
the models' class probabilities, then argmax (hemorrhage = IPH + EAH + IVH). Prints and writes
(``--json``) each model's and each ensemble's hemorrhage volume (mL), its Dice against the
ensemble of all models, and against the phantom truth where the study has
``truth/truth_mask.npz``.

    .venv/bin/python scripts/teacher_ensembles.py WEIGHTS STUDY [STUDY ...] --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ENSEMBLES = (1, 3, 12)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total


def _row(
    mask: np.ndarray, every: np.ndarray, truth: np.ndarray | None, geo: dict[str, Any], volume: Any
) -> dict[str, Any]:
    """Volume (mL) of ``mask``, its Dice against the all-model ensemble and against the truth."""
    return {
        "ml": volume.planimetric_volume_ml(mask, **geo),
        "dice_vs_all": _dice(mask, every),
        "dice_vs_truth": None if truth is None else _dice(mask, truth),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", type=Path, help="folder of converted BLAST-CT models with manifest.json")
    parser.add_argument("studies", type=Path, nargs="+")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from worker.imaging.dicom_load import load_study
    from worker.imaging.series_selection import SelectionRules
    from worker.measure import volume
    from worker.measure.teacher import (
        HEMORRHAGE_CLASSES,
        MARGIN,
        TILE,
        BlastCtTeacher,
        predict_teacher,
        teacher_engine,
    )
    from worker.model.blast_ct_net import build_blast_ct, read_blast_ct_arrays, set_blast_ct_weights, shipped_blast_ct

    weights = shipped_blast_ct(args.weights)
    kind = teacher_engine("auto")
    sizes = [n for n in ENSEMBLES if n < len(weights)] + [len(weights)]
    out: dict[str, Any] = {}
    for study in args.studies:
        series = load_study(study, rules=SelectionRules())
        geo = {"pixel_spacing_mm": series.pixel_spacing_mm, "slab_thickness_mm": series.slab_thickness_mm}
        truth = None
        if (study / "truth" / "truth_mask.npz").is_file():
            with np.load(study / "truth" / "truth_mask.npz") as data:
                index = {str(u): k for k, u in enumerate(data["sop_instance_uids"])}
                truth = data["mask"][[index[s.sop_instance_uid] for s in series.slices]]
        sums: dict[int, np.ndarray] = {}
        masks = []
        for k, w in enumerate(weights):
            started = time.perf_counter()
            model = build_blast_ct(input_size=TILE + 2 * MARGIN, dtype=kind)
            set_blast_ct_weights(model, read_blast_ct_arrays(w))
            pred = predict_teacher(series, BlastCtTeacher([model], [w.name], [w.sha256], engine=kind))
            masks.append(pred.hemorrhage_mask)
            for n in sizes:
                if k < n:
                    sums[n] = pred.probabilities if n not in sums else sums[n] + pred.probabilities
            ml = volume.planimetric_volume_ml(masks[-1], **geo)  # type: ignore[arg-type]
            print(f"{study.name} {w.name}: {ml:.2f} mL in {time.perf_counter() - started:.0f} s", flush=True)
        ensembles = {n: np.isin(np.argmax(s, axis=0), HEMORRHAGE_CLASSES).astype(np.uint8) for n, s in sums.items()}
        every = ensembles[len(weights)]

        result: dict[str, Any] = {
            "truth_ml": None if truth is None else volume.planimetric_volume_ml(truth, **geo),  # type: ignore[arg-type]
            "ensembles": {str(n): _row(m, every, truth, geo, volume) for n, m in ensembles.items()},
            "single": [
                {"model": w.name, **_row(m, every, truth, geo, volume)} for w, m in zip(weights, masks, strict=True)
            ],
        }
        out[study.name] = result
        print(json.dumps({study.name: result["ensembles"]}), flush=True)
        if args.json:
            args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
