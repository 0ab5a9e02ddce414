"""The skull and the skull-enclosed space of an 8-bit windowed slice image (no HU).

Research use only, not for clinical use.

In any brain window bone lies far above the window's top, so the skull is **saturated**
(level 255) in a windowed export. Dense blood can saturate too, so saturation alone is not
bone: the skull is the largest connected piece of saturated pixels (after a 5-pixel median
filter, which also removes JPEG ringing) plus any saturated piece at least a fifth of its
size (a skull ring broken at the skull base), within the head (head-holder arcs lie apart
from it); saturated pieces inside it (a bright hematoma, a calcification) stay part of the
enclosed space. The enclosed space then follows the same steps as for HU
(:func:`worker.measure.postprocess.enclosed_space`: bridge gaps of up to 10 mm, fill, shrink back,
1 mm rim removed, pieces under 100 mm^2 dropped). Where the ring stays open (a craniectomy,
bone thinner than saturation, a gap over 10 mm) that space leaks away: when it is under
half the convex hull of the skull pieces, the hull (minus bone and a 1 mm rim) is used
instead (``open_ring``). The DR-UNet authors' slice 005258 needs it.

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

from worker.measure.postprocess import (
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
# An enclosed space under half the skull's convex hull means the ring leaked.
OPEN_RING_SHARE = 0.5


@dataclass(frozen=True)
class ImageSkull:
    """Skull pixels, the enclosed space and the pixel size used (mm, estimated or given)."""

    bone: U8
    inside: U8
    pixel_mm: float
    open_ring: bool = False  # the ring did not close: ``inside`` is the convex hull of the skull


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
            open_ring=found.open_ring,
        )
    return _skull(image, size_mm)


def _head(image: U8) -> U8:
    """The largest connected region above level 40 (the head; head-holder arcs lie apart from it)."""
    head = (image > _HEAD_LEVEL).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(head, connectivity=8)
    if n < 2:
        return np.zeros(image.shape, dtype=np.uint8)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    out: U8 = (labels == largest).astype(np.uint8)
    return out


def _hull_space(bone: U8, erosion: U8) -> U8:
    """Inside the convex hull of the skull, minus the bone and a 1 mm rim (for an open ring)."""
    points = cv2.findNonZero(bone)
    space = np.zeros(bone.shape, dtype=np.uint8)
    if points is None or len(points) < 3:
        return space
    cv2.fillConvexPoly(space, cv2.convexHull(points), 1)
    space &= 1 - bone
    # Shrink away from the hull's edge as from the inner table.
    out: U8 = np.asarray(cv2.erode(space, erosion, borderType=cv2.BORDER_CONSTANT, borderValue=0), dtype=np.uint8)
    return out


def _skull(image: U8, size_mm: float) -> ImageSkull:
    smooth = np.asarray(cv2.medianBlur(image, 5), dtype=np.uint8)
    saturated = ((smooth >= SATURATED_LEVEL) & (_head(smooth) > 0)).astype(np.uint8)
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
    hull = _hull_space(bone, erosion)
    if hull.any() and inside.sum() < OPEN_RING_SHARE * hull.sum():
        # The ring is open (a craniectomy, thin bone below saturation, a gap wider than 10 mm):
        # the enclosed space leaks away; the convex hull of the skull pieces stands in for it.
        return ImageSkull(bone=bone, inside=hull, pixel_mm=size_mm, open_ring=True)
    return ImageSkull(bone=bone, inside=inside, pixel_mm=size_mm)
