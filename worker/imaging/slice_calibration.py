"""8-bit windowed slice images (screenshots, PNG/JPEG exports) to estimated HU.

Research use only, not for clinical use.

An 8-bit slice has lost its Hounsfield units: each grey level stands for an HU value
that depends on the display window the image was exported with, which is usually not
known. The model was trained on HU (mapped to [-1, 1] through its own window), so the
image must first be given HU back. Three ways (:class:`ImageCalibration`):

* ``window``: the export window is known (``--display-window LOW HIGH``): level 0 is
  ``LOW`` HU, level 255 is ``HIGH`` HU, linear in between. Exact up to rounding.
* ``parenchyma`` (the default): the window's **level** is re-anchored on the image
  itself. The most common grey level of the brain parenchyma in the centre of the head
  (:func:`parenchyma_level`) is taken to be :data:`PARENCHYMA_HU` (33 HU), and the 256
  levels are taken to span ``width_hu`` HU (by default the model's own window width).
  33 HU is what the same estimator reads on the supratentorial slices of the real GE head
  CT (28-34 HU; grey matter is 35-45 HU, white matter 20-30 HU, and the central head
  mixes both). The window *width* cannot be read off one image; blood still stands
  clearly above the parenchyma whatever the width, and the model is trained on images
  re-anchored this way from random display windows (W 60-140 HU).
* ``none``: the seed's convention: level 0 is the low end and 255 the high end of the
  model's own window (right only if the images were exported with exactly that window).

Before this re-anchoring, the DR-UNet authors' 14 real slices (exported with a narrow
brain window: parenchyma near level 147, blood near 230) reached the model as if the
parenchyma were 49 HU and blood 88-100 HU, i.e. like calcification.

Arrays: ``(rows, columns)`` uint8 in, float32 HU out, same shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

__all__ = [
    "CALIBRATIONS",
    "PARENCHYMA_HU",
    "ImageCalibration",
    "calibrate_image",
    "parenchyma_level",
]

U8 = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]

PARENCHYMA_HU = 33.0
CALIBRATIONS = ("parenchyma", "window", "none")
# Grey levels that count as head (above air and the dark background of a screenshot).
_HEAD_LEVEL = 40
# Share of the head's equivalent diameter eroded away: leaves the central brain, no skull, no scalp.
_CORE_EROSION = 0.12
# Histogram levels considered parenchyma: excludes air and saturated bone.
_LEVEL_RANGE = (40, 245)
# Histogram smoothing: a Gaussian of 2 levels (symmetric, so a sharp peak stays where it is).
_PEAK_KERNEL = np.exp(-0.5 * (np.arange(-6, 7) / 2.0) ** 2)


@dataclass(frozen=True)
class ImageCalibration:
    """How the levels 0..255 of one image map to HU: ``hu = low_hu + level * (high_hu - low_hu) / 255``.

    ``method``: ``parenchyma``, ``window`` or ``none`` (module docstring);
    ``parenchyma_level``: the level read as :data:`PARENCHYMA_HU` (``parenchyma`` only);
    ``note``: why a requested ``parenchyma`` calibration fell back to ``none`` (no head found).
    """

    method: str
    low_hu: float
    high_hu: float
    parenchyma_level: float | None = None
    note: str = ""

    def to_hu(self, pixels: npt.NDArray[np.integer]) -> F32:
        """The image's levels as HU, float32, same shape."""
        scale = (self.high_hu - self.low_hu) / 255.0
        out: F32 = (np.asarray(pixels, dtype=np.float32) * np.float32(scale) + np.float32(self.low_hu)).astype(
            np.float32
        )
        return out

    def as_json(self) -> dict[str, object]:
        return {
            "method": self.method,
            "level_0_hu": round(self.low_hu, 2),
            "level_255_hu": round(self.high_hu, 2),
            "parenchyma_level": None if self.parenchyma_level is None else round(self.parenchyma_level, 1),
            "note": self.note,
        }


def parenchyma_level(pixels: U8) -> float | None:
    """The most common grey level of the central head (brain parenchyma), or ``None`` without a head.

    The head is the largest connected region above level 40 (after a 5-pixel median
    filter); it is eroded by 12 % of its equivalent diameter, which leaves the central brain
    without skull or scalp on an axial slice; the histogram of that core between levels 40
    and 245, smoothed by a Gaussian of 2 levels, peaks at the parenchyma. ``pixels``: ``(rows, columns)``
    uint8.
    """
    image = np.ascontiguousarray(pixels, dtype=np.uint8)
    if image.ndim != 2 or min(image.shape) < 16:
        return None
    head = (cv2.medianBlur(image, 5) > _HEAD_LEVEL).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(head, connectivity=8)
    if n < 2:
        return None
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    area = int(stats[largest, cv2.CC_STAT_AREA])
    if area < 0.02 * image.size:
        return None
    radius = max(1.0, _CORE_EROSION * float(np.sqrt(area)))
    # Erosion by a disk = distance to the outside greater than the radius (fast at any radius).
    distance = cv2.distanceTransform((labels == largest).astype(np.uint8), cv2.DIST_L2, 5)
    core = distance > radius
    values = image[core]
    values = values[(values > _LEVEL_RANGE[0]) & (values < _LEVEL_RANGE[1])]
    if values.size < 200:
        return None
    histogram = np.bincount(values, minlength=256).astype(np.float64)
    smooth = np.convolve(histogram, _PEAK_KERNEL, mode="same")
    return float(np.argmax(smooth))


def calibrate_image(
    pixels: U8,
    *,
    method: str = "parenchyma",
    model_window: tuple[float, float],
    display_window: tuple[float, float] | None = None,
    width_hu: float | None = None,
) -> ImageCalibration:
    """The HU mapping of one 8-bit image (module docstring).

    ``model_window``: the model's HU window (the ``none`` mapping, and the default width);
    ``display_window``: the export window, needed by ``window``; ``width_hu``: the HU the 256
    levels span for ``parenchyma`` (default: the model window's width).
    """
    if method not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {', '.join(CALIBRATIONS)}, got {method!r}")
    low, high = float(model_window[0]), float(model_window[1])
    if method == "window":
        if display_window is None:
            raise ValueError("the 'window' calibration needs the display window (low, high) in HU")
        d_low, d_high = float(display_window[0]), float(display_window[1])
        if not d_high > d_low:
            raise ValueError(f"display window must have high > low, got {display_window}")
        return ImageCalibration("window", d_low, d_high)
    if method == "none":
        return ImageCalibration("none", low, high)
    width = float(width_hu) if width_hu is not None else high - low
    if not width > 0:
        raise ValueError(f"width_hu must be positive, got {width_hu}")
    level = parenchyma_level(pixels)
    if level is None:
        return ImageCalibration("none", low, high, note="no head found to anchor on: the model's window was assumed")
    low_hu = PARENCHYMA_HU - level * width / 255.0
    return ImageCalibration("parenchyma", low_hu, low_hu + width, parenchyma_level=level)
