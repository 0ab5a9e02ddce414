"""The skull and the skull-enclosed space of an 8-bit windowed slice image (no HU).

Research use only, not for clinical use.

In any brain window bone lies far above the window's top, so the skull is **saturated**
(level 255) in a windowed export. Dense blood can saturate too, so saturation alone is not
bone: the skull is the largest connected piece of saturated pixels (after a 5-pixel median
filter, which also removes JPEG ringing) plus any saturated piece at least a fifth of its
size (a skull ring broken at the skull base); saturated pieces inside it (a bright
hematoma, a calcification) stay part of the enclosed space. The enclosed space then
follows the same steps as for HU (:func:`worker.postprocess.enclosed_space`: bridge gaps
of up to 10 mm, fill, shrink back, 1 mm rim removed, pieces under 100 mm^2 dropped).

Images carry no pixel spacing, so the mm sizes of those steps need an estimate:
:func:`estimate_pixel_mm` takes the head's outer width (the widest row of the head
region) as :data:`HEAD_WIDTH_MM` (150 mm, an adult head's biparietal breadth is
about 140-160 mm). The estimate only sizes morphology and growth limits; reported areas
use the spacing the user gives, never this one.

Arrays: ``(rows, columns)`` uint8 in; uint8 0/1 masks out.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from worker.postprocess import (
    DEFAULT_BRIDGE_RADIUS_MM,
    DEFAULT_EROSION_MM,
    DEFAULT_MIN_AREA_MM2,
    ellipse_kernel,
    enclosed_space,
)

__all__ = ["HEAD_WIDTH_MM", "ImageSkull", "estimate_pixel_mm", "image_skull"]

U8 = npt.NDArray[np.uint8]

HEAD_WIDTH_MM = 150.0
SATURATED_LEVEL = 250
_HEAD_LEVEL = 40
_DEFAULT_PIXEL_MM = 0.5  # when no head is found at all
_WORKING_SIDE = 512


@dataclass(frozen=True)
class ImageSkull:
    """Skull pixels, the enclosed space and the pixel size used (mm, estimated or given)."""

    bone: U8
    inside: U8
    pixel_mm: float


def estimate_pixel_mm(pixels: U8) -> float:
    """Pixel size in mm from the head's outer width (:data:`HEAD_WIDTH_MM`); 0.5 mm without a head."""
    head = (cv2.medianBlur(np.ascontiguousarray(pixels, dtype=np.uint8), 5) > _HEAD_LEVEL).astype(np.uint8)
    n, _labels, stats, _ = cv2.connectedComponentsWithStats(head, connectivity=8)
    if n < 2:
        return _DEFAULT_PIXEL_MM
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    width_px = int(stats[largest, cv2.CC_STAT_WIDTH])
    if width_px < 16:
        return _DEFAULT_PIXEL_MM
    return HEAD_WIDTH_MM / width_px


def image_skull(pixels: U8, *, pixel_mm: float | None = None) -> ImageSkull:
    """The skull and the enclosed space of one 8-bit slice (module docstring).

    ``pixel_mm``: the image's pixel size if known (isotropic); estimated otherwise. Images
    larger than 512 pixels are analysed at 512 (the morphology is in mm, and a screenshot's
    1440 pixels hold no more skull than a CT's 512) and the masks scaled back.
    """
    image = np.ascontiguousarray(pixels, dtype=np.uint8)
    size_mm = float(pixel_mm) if pixel_mm is not None else estimate_pixel_mm(image)
    side = max(image.shape)
    if side > _WORKING_SIDE:
        factor = _WORKING_SIDE / side
        small = np.asarray(
            cv2.resize(
                image,
                (max(1, round(image.shape[1] * factor)), max(1, round(image.shape[0] * factor))),
                interpolation=cv2.INTER_AREA,
            ),
            dtype=np.uint8,
        )
        found = _skull(small, size_mm / factor)
        full = (image.shape[1], image.shape[0])
        return ImageSkull(
            bone=np.asarray(cv2.resize(found.bone, full, interpolation=cv2.INTER_NEAREST), dtype=np.uint8),
            inside=np.asarray(cv2.resize(found.inside, full, interpolation=cv2.INTER_NEAREST), dtype=np.uint8),
            pixel_mm=size_mm,
        )
    return _skull(image, size_mm)


def _skull(image: U8, size_mm: float) -> ImageSkull:
    saturated = (cv2.medianBlur(image, 5) >= SATURATED_LEVEL).astype(np.uint8)
    bone = np.zeros(image.shape, dtype=np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(saturated, connectivity=8)
    if n >= 2:
        areas = stats[1:, cv2.CC_STAT_AREA]
        keep = np.zeros(n, dtype=bool)
        keep[1:] = areas >= 0.2 * areas.max()
        bone = keep[labels].astype(np.uint8)
    bridge = ellipse_kernel(DEFAULT_BRIDGE_RADIUS_MM, size_mm, size_mm)
    erosion = ellipse_kernel(DEFAULT_EROSION_MM, size_mm, size_mm)
    inside = enclosed_space(
        bone,
        bridge=bridge,
        erosion=erosion,
        pad=max(bridge.shape) // 2 + 1,
        min_area_px=DEFAULT_MIN_AREA_MM2 / (size_mm * size_mm),
    )
    return ImageSkull(bone=bone, inside=inside, pixel_mm=size_mm)
