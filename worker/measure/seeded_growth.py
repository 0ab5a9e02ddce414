"""Seeded growth: the model's confident hematoma grown into the connected blood-density region around it.

Research use only, not for clinical use.

The default model often marks only the dense core of a large real bleed. Blood on
non-contrast CT is a connected region of blood density (acute blood 50-90 HU) with a
sharp margin, so a confident core can be completed from the image itself. The rule, per
axial slice (arrays ``(slices, rows, columns)``, masks uint8 0/1):

1. **Seeds, never from nothing**: a connected piece (8-connected, in the slice) of the
   model's mask is a seed only if its highest probability reaches ``seed_probability``.
   Pieces below that are kept as they are but never grow. No seed, no growth.
2. **Where blood may be**: HU smoothed with a Gaussian of ``smoothing_mm`` within
   ``[hu_low, hu_high]``, inside the skull-enclosed space, and at least ``bone_margin_mm``
   away from bone, so growth never runs along the inner table, the dura or the partial
   volume of bone, and never crosses it.
3. **How far**: the seed grows by constrained dilation (alternating 4- and 8-connected
   steps, an octagonal approximation of the Euclidean distance) through that region, at
   most ``max_distance_mm`` from the seed. The cap stops a single seed from flooding a
   large region of similar density (e.g. dense grey matter on a noisy scan).
4. The result is the union of the model's mask and the grown region.

Growth is per slice, in the slice's plane: a bleed the model misses on a whole slice is
not added from its neighbours (3-D growth through 5 mm slabs reached partial-volume bone
and tentorium on the phantoms; see MODEL_CARD.md). ``pixel_spacing_mm`` is ``(between
rows, between columns)``; distances are in mm along the slice plane.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import cv2
import numpy as np
import numpy.typing as npt

__all__ = [
    "GrowthSettings",
    "blood_region",
    "grow_from_seeds",
]

U8 = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]
Bool = npt.NDArray[np.bool_]

_CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
_SQUARE = np.ones((3, 3), dtype=np.uint8)


@dataclass(frozen=True)
class GrowthSettings:
    """The seeded-growth rule's parameters (module docstring). HU, mm, probability in [0, 1]."""

    enabled: bool = True
    hu_low: float = 50.0
    hu_high: float = 90.0
    seed_probability: float = 0.8
    max_distance_mm: float = 15.0
    bone_hu: float = 170.0
    bone_margin_mm: float = 2.0
    smoothing_mm: float = 0.7

    def __post_init__(self) -> None:
        if not self.hu_high > self.hu_low:
            raise ValueError(f"growth HU range must have high > low, got [{self.hu_low}, {self.hu_high}]")
        if not 0.0 <= self.seed_probability <= 1.0:
            raise ValueError(f"seed probability must lie in [0, 1], got {self.seed_probability}")
        for name in ("max_distance_mm", "bone_margin_mm", "smoothing_mm"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a non-negative number of mm, got {value}")

    def as_json(self) -> dict[str, object]:
        return asdict(self)


def _disk(radius_px: float) -> U8:
    r = max(math.ceil(radius_px), 0)
    kernel: U8 = np.asarray(cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)), dtype=np.uint8)
    return kernel


def blood_region(
    hu: npt.NDArray[np.floating],
    *,
    inside: npt.NDArray[np.integer] | Bool,
    bone: npt.NDArray[np.integer] | Bool | None = None,
    pixel_spacing_mm: tuple[float, float],
    settings: GrowthSettings,
) -> Bool:
    """Where growth may go, one slice ``(rows, columns)``: blood density, inside, away from bone.

    ``inside``: the skull-enclosed space; ``bone``: bone pixels (default: smoothed HU above
    ``settings.bone_hu``). Returns a boolean array of the slice's shape.
    """
    row_mm, col_mm = float(pixel_spacing_mm[0]), float(pixel_spacing_mm[1])
    image = np.nan_to_num(np.asarray(hu, dtype=np.float32), nan=-1024.0)
    if settings.smoothing_mm > 0:
        image = np.asarray(
            cv2.GaussianBlur(
                image,
                (0, 0),
                sigmaX=max(settings.smoothing_mm / col_mm, 0.3),
                sigmaY=max(settings.smoothing_mm / row_mm, 0.3),
            ),
            dtype=np.float32,
        )
    bone_px = (image > settings.bone_hu) if bone is None else np.asarray(bone, dtype=bool)
    region = (image >= settings.hu_low) & (image <= settings.hu_high) & np.asarray(inside, dtype=bool)
    if bone_px.any() and settings.bone_margin_mm > 0:
        margin = _disk(settings.bone_margin_mm / min(row_mm, col_mm))
        near_bone = cv2.dilate(bone_px.astype(np.uint8), margin) > 0
        region &= ~near_bone
    out: Bool = region
    return out


def _grow_slice(seeds: Bool, region: Bool, *, steps: int) -> Bool:
    """Constrained dilation of ``seeds`` through ``region`` for ``steps`` steps (in a bounding box)."""
    rows, cols = np.nonzero(seeds)
    pad = steps + 1
    r0, r1 = max(int(rows.min()) - pad, 0), min(int(rows.max()) + pad + 1, seeds.shape[0])
    c0, c1 = max(int(cols.min()) - pad, 0), min(int(cols.max()) + pad + 1, seeds.shape[1])
    allowed = (region[r0:r1, c0:c1] | seeds[r0:r1, c0:c1]).astype(np.uint8)
    grown = seeds[r0:r1, c0:c1].astype(np.uint8)
    for step in range(steps):
        kernel = _CROSS if step % 2 == 0 else _SQUARE
        bigger = np.asarray(cv2.dilate(grown, kernel), dtype=np.uint8) & allowed
        if np.array_equal(bigger, grown):
            break
        grown = bigger
    out = np.zeros(seeds.shape, dtype=bool)
    out[r0:r1, c0:c1] = grown > 0
    return out


def grow_from_seeds(
    mask: npt.NDArray[np.integer],
    *,
    probabilities: npt.NDArray[np.floating],
    region: Bool,
    pixel_spacing_mm: tuple[float, float],
    settings: GrowthSettings,
) -> U8:
    """The model's ``mask`` grown into ``region`` from its confident pieces (module docstring).

    ``mask``, ``probabilities`` and ``region`` (from :func:`blood_region`, per slice):
    ``(slices, rows, columns)`` or one ``(rows, columns)`` slice. Returns uint8 0/1 of the
    same shape; with ``settings.enabled`` false, the mask unchanged.
    """
    binary = np.asarray(mask) != 0
    single = binary.ndim == 2
    if single:
        binary, probabilities, region = binary[None], np.asarray(probabilities)[None], np.asarray(region)[None]
    if binary.shape != np.shape(probabilities) or binary.shape != np.shape(region):
        raise ValueError(
            f"mask {binary.shape}, probabilities {np.shape(probabilities)} and region {np.shape(region)} must match"
        )
    out = binary.copy()
    if settings.enabled:
        steps = max(0, round(settings.max_distance_mm / min(float(pixel_spacing_mm[0]), float(pixel_spacing_mm[1]))))
        for k in np.flatnonzero(binary.reshape(binary.shape[0], -1).any(axis=1)):
            n, labels = cv2.connectedComponents(binary[k].astype(np.uint8), connectivity=8)
            peak = np.zeros(n, dtype=np.float64)
            np.maximum.at(peak, labels.ravel(), np.asarray(probabilities[k], dtype=np.float64).ravel())
            confident = peak >= settings.seed_probability
            confident[0] = False
            if not confident.any() or steps == 0:
                continue
            seeds = confident[labels]
            out[k] |= _grow_slice(seeds, np.asarray(region[k], dtype=bool), steps=steps)
    result: U8 = out.astype(np.uint8)
    return result[0] if single else result
