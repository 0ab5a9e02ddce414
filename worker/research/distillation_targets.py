"""Distillation targets: what DR-UNet is fine-tuned towards, from the teacher's hemorrhage probability.

Research use only, not for clinical use.

``soft``, ``grown`` (the default), ``union`` and the temperature are explained in
:mod:`worker.research.distillation` (module docstring) and measured in MODEL_CARD.md. Every
array here is ``(z, y, x)`` on the study's native grid; probabilities and targets are
float32 in [0, 1].
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import numpy.typing as npt

from worker.core.ct import CtSeries
from worker.core.errors import ConfigurationError
from worker.measure import postprocess
from worker.measure.pipeline import SegmentationOptions

__all__ = ["TARGETS", "TEACHER_THRESHOLD", "distillation_targets", "tempered"]

F32 = npt.NDArray[np.float32]

TARGETS = ("soft", "grown", "union")
TEACHER_THRESHOLD = 0.5  # the teacher's mask: hemorrhage probability >= this


def tempered(probability: npt.NDArray[np.floating], temperature: float) -> F32:
    """``sigmoid(logit(p) / T)``, float32: T > 1 softens the teacher towards 0.5, T < 1 sharpens it, T = 1 is ``p``.

    The order of probabilities is kept, and 0.5 stays 0.5, so the teacher's mask (p >= 0.5)
    does not change; only how sure the soft targets are.
    """
    p = np.clip(np.asarray(probability, dtype=np.float32), 0.0, 1.0)
    if temperature == 1.0:
        return p
    if temperature <= 0.0:
        raise ConfigurationError(f"--temperature must be above 0, got {temperature}")
    eps = np.float32(1e-6)
    q = np.clip(p, eps, 1.0 - eps)
    logit = np.log(q) - np.log1p(-q)
    return (1.0 / (1.0 + np.exp(-logit / np.float32(temperature)))).astype(np.float32)


def distillation_targets(
    hemorrhage: npt.NDArray[np.floating],
    series: CtSeries,
    *,
    targets: str,
    options: SegmentationOptions,
    temperature: float = 1.0,
    base_mask: npt.NDArray[np.integer] | None = None,
) -> F32:
    """The training target ``(z, y, x)`` float32 in [0, 1] on the native grid (module docstring).

    ``soft``: the teacher's hemorrhage probability (tempered by ``temperature``). ``grown``:
    its maximum with the teacher's mask (probability >= 0.5) grown by the pipeline's
    seeded-growth rule (``options.growth``, applied even where the pipeline's growth is
    switched off). ``union``: ``grown`` and, as 1, the base DR-UNet's own final mask
    ``base_mask`` (``(z, y, x)``, the post-processing of ``ichvol segment``), so blood the
    teacher does not call (dark collections, small bleeds) but the base model finds stays.
    """
    soft = tempered(hemorrhage, temperature)
    if targets == "soft":
        return soft
    if targets not in TARGETS:
        raise ConfigurationError(f"unknown distillation targets {targets!r}: use one of {', '.join(TARGETS)}")
    grown = postprocess.grow_into_blood(
        (soft >= TEACHER_THRESHOLD).astype(np.uint8),
        probabilities=soft,
        hu=series.hu,
        pixel_spacing_mm=series.pixel_spacing_mm,
        settings=replace(options.growth, enabled=True),
    )
    target = np.maximum(soft, grown.astype(np.float32))
    if targets == "union":
        if base_mask is None or np.shape(base_mask) != target.shape:
            raise ConfigurationError("union targets need the base model's mask on the same grid")
        target = np.maximum(target, (np.asarray(base_mask) != 0).astype(np.float32))
    return target
