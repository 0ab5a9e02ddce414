#!/usr/bin/env python
"""Choose a weights file's decision threshold and write it into a copy of the file.

Research use only, not for clinical use.

Each candidate threshold is measured through the shipped post-processing (intracranial
restriction, seeded growth, small components dropped; `worker.measure.pipeline.final_mask`):

* on held-out phantoms of every kind and size of ``scripts/evaluate_default.py``'s table,
  on seeds of their own (5,550,000 and up: no evaluation table, training run or phantom
  site uses them), mean 3-D Dice and mean absolute volume error;
* on the masked real slices (``ichvol evaluate-images``' path), mean Dice and slices found;
* on the real GE head CT without hemorrhage, false volume.

The model runs once per study; only the post-processing is repeated per threshold. The
threshold chosen (`worker.research.threshold_calibration.choose_threshold`) has the best
mean of phantom and real Dice among those with < 1 mL on the GE scan, no fewer real
slices found and no larger phantom volume error than the lowest candidate. The copy's
metadata carries it and every candidate's scores (provenance); the network's weights are
unchanged. Never writes over the weights it calibrates.

    .venv/bin/python scripts/calibrate_threshold.py --out v4.1.keras --version drunet-d8-s160-physical-v4.1
    .venv/bin/python scripts/calibrate_threshold.py --model m.keras --out m-cal.keras --quick
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from evaluate_default import CASES, GE_DIR, REPO, phantom_spec, write_phantom

REAL_IMAGES = REPO.parent / "shared" / "data" / "drunet-test-slices"
REAL_MASKS = REPO.parent / "shared" / "data" / "drunet-test-slices-masks"
SEED_BASE = 5_550_000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="weights file (default: the shipped model)")
    parser.add_argument("--out", type=Path, required=True, help="the calibrated copy to write (.keras)")
    parser.add_argument("--version", default=None, help="version of the copy (default: the base's)")
    parser.add_argument("--thresholds", default="0.5,0.6,0.7,0.8,0.9", help="comma-separated candidates in (0, 1)")
    parser.add_argument("--seeds", type=int, default=2, help="phantom studies per kind and size")
    parser.add_argument("--quick", action="store_true", help="one seed, medium sizes only")
    parser.add_argument("--engine", default="folded", help="inference engine (default: folded, float32)")
    parser.add_argument(
        "--max-false-ml", type=float, default=None, help="false-volume limit on the GE scan (default 1 mL)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write every candidate's scores here")
    args = parser.parse_args(argv)
    try:
        thresholds = sorted({float(t) for t in args.thresholds.split(",")})
    except ValueError:
        parser.error(f"--thresholds: expected numbers, got {args.thresholds!r}")
    if not all(0.0 < t < 1.0 for t in thresholds):
        parser.error("--thresholds must lie strictly between 0 and 1")

    from worker.core.ct import CtSeries
    from worker.core.errors import ConfigurationError
    from worker.imaging.dicom_load import load_study
    from worker.measure import volume
    from worker.measure.image_inference import ImageOptions
    from worker.measure.pipeline import SegmentationOptions, final_mask
    from worker.model import preprocess
    from worker.model.engines import load_segmenter
    from worker.model.weights import resolve_model_path
    from worker.research.distillation import mask_dice
    from worker.research.image_yardstick import load_reference_pairs, score_pairs
    from worker.research.threshold_calibration import ThresholdScore, choose_threshold, write_calibrated_copy
    from worker.synth.phantom import LesionSpec

    base_path, _ = resolve_model_path(None if args.model is None else str(args.model))
    if args.out.resolve() == base_path.resolve():
        print("calibrate_threshold.py: --out must be a new file, not the weights being calibrated", file=sys.stderr)
        return 2
    segmenter = load_segmenter(base_path, engine=args.engine)
    info = segmenter.info
    options = SegmentationOptions()

    def probabilities(series: CtSeries) -> np.ndarray:
        x, fit = preprocess.to_model_input(series.hu, size=info.input_size, window=info.hu_window)
        return preprocess.to_native(segmenter.predict(x), fit)

    def mask_at(prob: np.ndarray, series: CtSeries, threshold: float) -> np.ndarray:
        return final_mask(prob, series, SegmentationOptions(threshold=threshold))

    def volume_ml(mask: np.ndarray, series: CtSeries) -> float:
        return volume.planimetric_volume_ml(
            mask, pixel_spacing_mm=series.pixel_spacing_mm, slab_thickness_mm=series.slab_thickness_mm
        )

    dice: dict[float, list[float]] = {t: [] for t in thresholds}
    error: dict[float, list[float]] = {t: [] for t in thresholds}
    cases = [(k, v) for k, vs in CASES.items() for v in ((vs[1],) if args.quick else vs)]
    jobs = [(k, v, s) for k, v in cases for s in range(1 if args.quick else args.seeds)]
    with tempfile.TemporaryDirectory() as tmp:
        for n, (kind, target_ml, s) in enumerate(jobs):
            spec = phantom_spec((LesionSpec(kind, volume_ml=target_ml),), tilted=bool(n % 2))
            study = Path(tmp) / f"study-{n}"
            truth = write_phantom(study, spec, SEED_BASE + n * 7 + s, label=f"{kind} {target_ml}")
            if truth is None:
                continue
            series = load_study(study, rules=options.rules)
            order = {sl.sop_instance_uid: i for i, sl in enumerate(series.slices)}
            index = [order[u] for u in truth.sop_instance_uids]
            prob = probabilities(series)
            for t in thresholds:
                mask = mask_at(prob, series, t)
                dice[t].append(mask_dice(truth.mask, mask[index]))
                error[t].append(abs(volume_ml(mask, series) - truth.analytic_volume_ml))
            print(f"{kind:17s} {target_ml:5.1f} mL: " + " ".join(f"{t:g}:{dice[t][-1]:.3f}" for t in thresholds))
    real: dict[float, tuple[float, int]] = {}
    pairs = []
    if REAL_IMAGES.is_dir() and REAL_MASKS.is_dir():
        pairs = load_reference_pairs(REAL_IMAGES, REAL_MASKS)
        for t in thresholds:
            result, _ = score_pairs(pairs, segmenter=segmenter, options=ImageOptions(threshold=t))
            real[t] = (float(result.summary()["real_dice"]), int(result.n_found))
    else:
        print(f"real slices absent ({REAL_IMAGES}): chosen on phantoms alone", file=sys.stderr)
    false_ml: dict[float, float] = {}
    if GE_DIR.is_dir():
        series = load_study(GE_DIR, rules=options.rules)
        prob = probabilities(series)
        for t in thresholds:
            false_ml[t] = volume_ml(mask_at(prob, series, t), series)
    else:
        print(f"the GE scan is absent ({GE_DIR}): false volume unmeasured", file=sys.stderr)
    if not dice[thresholds[0]]:
        print("calibrate_threshold.py: no phantom could be written", file=sys.stderr)
        return 2
    scores = [
        ThresholdScore(
            threshold=t,
            phantom_dice=float(np.mean(dice[t])),
            phantom_mae_ml=float(np.mean(error[t])),
            real_dice=real[t][0] if t in real else None,
            real_found=real[t][1] if t in real else None,
            false_ml=false_ml.get(t),
        )
        for t in thresholds
    ]
    try:
        chosen = (
            choose_threshold(scores)
            if args.max_false_ml is None
            else choose_threshold(scores, max_false_ml=args.max_false_ml)
        )
    except ConfigurationError as exc:
        print(f"calibrate_threshold.py: {exc}", file=sys.stderr)
        return 2
    print(f"\n{info.version} ({base_path.name}), {len(dice[thresholds[0]])} phantoms")
    print("| threshold | phantoms: mean Dice, MAE | real slices: mean Dice, found | GE false volume | score |")
    print("|---|---|---|---|---|")
    for score in scores:
        real_cell = "-" if score.real_dice is None else f"{score.real_dice:.3f}, {score.real_found}"
        ge_cell = "-" if score.false_ml is None else f"{score.false_ml:.2f} mL"
        mark = " (chosen)" if score is chosen else ""
        print(
            f"| {score.threshold:g}{mark} | {score.phantom_dice:.4f}, {score.phantom_mae_ml:.2f} mL | {real_cell} | "
            f"{ge_cell} | {score.selection:.4f} |"
        )
    measured_on = {
        "phantoms": len(dice[thresholds[0]]),
        "phantom_seeds_from": SEED_BASE,
        "real_slices": sum(1 for p in pairs if p.reference is not None),
        "bleed_free_scan": GE_DIR.name if false_ml else None,
        "engine": args.engine,
    }
    written = write_calibrated_copy(
        base_path, args.out, chosen=chosen, scores=scores, measured_on=measured_on, version=args.version
    )
    print(f"\nwrote {args.out}: {written.version}, threshold {written.threshold:g}, sha256 {written.sha256}")
    if args.json:
        args.json.write_text(
            json.dumps({"chosen": chosen.as_json(), "candidates": [s.as_json() for s in scores]}, indent=1) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
