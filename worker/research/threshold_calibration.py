"""The decision threshold of a weights file: the choice rule and the calibrated copy.

Research use only, not for clinical use.

A model's probabilities are turned into a mask at a threshold (``> threshold``). With
seeded growth in the post-processing (:mod:`worker.measure.seeded_growth`), the
thresholded mask is the *core* from which growth reaches a bleed's margin through the
blood-density region, so the best threshold of a model is not necessarily the sigmoid's
0.5: a model that marks partial-volume rims as blood over-segments at 0.5 and gains from a
higher core threshold, growth keeping its sensitivity. ``scripts/calibrate_threshold.py``
measures candidate thresholds on held-out phantoms of every kind (seeds no evaluation
table uses), on the masked real slices and on a real bleed-free scan, chooses one with
:func:`choose_threshold` and writes it into a copy of the weights with
:func:`write_calibrated_copy` (metadata only: the network's weights are unchanged).
Every measurement then uses it unless ``ICHVOL_THRESHOLD`` or ``--threshold`` asks for
another (:meth:`worker.model.weights.ModelInfo.decision_threshold`).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from worker.core.errors import ConfigurationError
from worker.model.weights import ModelInfo, read_model_info, sha256_of, write_model_info
from worker.research.training import combined_dice

__all__ = ["MAX_FALSE_ML", "ThresholdScore", "choose_threshold", "write_calibrated_copy"]

#: A threshold whose false volume on the bleed-free scan reaches this (mL) is never chosen.
MAX_FALSE_ML = 1.0


@dataclass(frozen=True)
class ThresholdScore:
    """What one candidate threshold measured.

    ``phantom_dice``: mean 3-D Dice over phantoms with blood; ``phantom_mae_ml``: their mean
    absolute volume error, mL; ``real_dice``: mean Dice over the masked real slices (None
    where they were not scored); ``real_found``: slices with Dice > 0.1; ``false_ml``: volume
    on the bleed-free scan(s), mL (None where not measured).
    """

    threshold: float
    phantom_dice: float
    phantom_mae_ml: float | None = None
    real_dice: float | None = None
    real_found: int | None = None
    false_ml: float | None = None

    @property
    def selection(self) -> float:
        """The choice score: the mean of the phantom and real Dice, as training chooses checkpoints."""
        return combined_dice(self.phantom_dice, self.real_dice)

    def as_json(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "phantom_dice": round(self.phantom_dice, 4),
            "phantom_mae_ml": None if self.phantom_mae_ml is None else round(self.phantom_mae_ml, 3),
            "real_dice": None if self.real_dice is None else round(self.real_dice, 4),
            "real_found": self.real_found,
            "false_ml": None if self.false_ml is None else round(self.false_ml, 3),
            "selection": round(self.selection, 4),
        }


def choose_threshold(scores: list[ThresholdScore], *, max_false_ml: float = MAX_FALSE_ML) -> ThresholdScore:
    """The best admissible candidate: highest :attr:`ThresholdScore.selection`, ties to the lower threshold.

    Admissible: false volume below ``max_false_ml`` (where measured), no fewer real slices
    found and no larger phantom volume error than at the lowest threshold measured (a
    calibration must not trade bleeds found or volumes, the product's output, for tighter
    outlines). Raises :class:`ConfigurationError` when none is admissible.
    """
    if not scores:
        raise ConfigurationError("no threshold was measured")
    ordered = sorted(scores, key=lambda s: s.threshold)
    lowest = ordered[0]

    def admissible_score(s: ThresholdScore) -> bool:
        if s.false_ml is not None and s.false_ml >= max_false_ml:
            return False
        if lowest.real_found is not None and s.real_found is not None and s.real_found < lowest.real_found:
            return False
        return not (
            lowest.phantom_mae_ml is not None
            and s.phantom_mae_ml is not None
            and s.phantom_mae_ml > lowest.phantom_mae_ml + 1e-9
        )

    admissible = [s for s in ordered if admissible_score(s)]
    if not admissible:
        raise ConfigurationError(
            f"every threshold marks {max_false_ml} mL or more on the bleed-free scan: calibrate a better model"
        )
    best = admissible[0]
    for score in admissible[1:]:
        if score.selection > best.selection:
            best = score
    return best


def write_calibrated_copy(
    base_path: Path,
    out_path: Path,
    *,
    chosen: ThresholdScore,
    scores: list[ThresholdScore],
    measured_on: Mapping[str, Any],
    version: str | None = None,
) -> ModelInfo:
    """Copy ``base_path`` to ``out_path`` with ``chosen.threshold`` in its metadata; return the new info.

    Only the metadata member changes (the network's weights are byte-identical). The
    provenance records the base's version and sha256, every candidate's scores, what they
    were measured on and the date; ``version`` (default: the base's) names the result.
    ``out_path`` must not be the base file.
    """
    base_path, out_path = Path(base_path), Path(out_path)
    if out_path.resolve() == base_path.resolve():
        raise ConfigurationError("--out must be a new file, not the weights being calibrated")
    base = read_model_info(base_path)
    provenance = dict(base.provenance)
    provenance["threshold_calibration"] = {
        "base_version": base.version,
        "base_sha256": base.sha256,
        "base_threshold": base.threshold,
        "threshold": chosen.threshold,
        "rule": f"highest mean of phantom and real-slice Dice; false volume < {MAX_FALSE_ML} mL on the "
        "bleed-free scan; no fewer real slices found and no larger phantom volume error than at the lowest "
        "threshold",
        "candidates": [s.as_json() for s in scores],
        "measured_on": dict(measured_on),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    info = replace(base, threshold=chosen.threshold, version=version or base.version, provenance=provenance, sha256="")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".partial")
    shutil.copyfile(base_path, tmp)
    write_model_info(tmp, info)
    tmp.replace(out_path)
    return replace(info, sha256=sha256_of(out_path))
