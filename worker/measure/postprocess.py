"""From model probabilities to the final hematoma mask: threshold, skull-enclosed space, small components.

numpy + OpenCV + scipy.ndimage. Arrays follow :mod:`worker.ct`: shape
``(slices, rows, columns)`` in sorted slice order; ``pixel_spacing_mm`` is
``(between rows, between columns)`` in mm; ``slab_thickness_mm`` is ``(slices,)`` mm along
the slice normal. Masks are uint8 with values 0 and 1.

The pipeline order is :func:`postprocess`: :func:`binarize`, then (unless disabled by the
``ICHVOL_INTRACRANIAL_ONLY`` setting) keep only the skull-enclosed space
(:func:`intracranial_mask`), then (unless ``ICHVOL_GROWTH=false``) grow confident pieces
into the connected blood-density region around them (:func:`grow_into_blood`, rule in
:mod:`worker.measure.seeded_growth`), then :func:`remove_small_components`, so that component
volumes are measured on what is finally reported.

The intracranial rule (per slice, on HU)
----------------------------------------
1. Light smoothing: Gaussian, sigma 0.5 mm (in pixels per axis, so anisotropic pixels are
   handled).
2. Bone: smoothed HU > ``bone_hu`` (default 170 HU; fresh blood is 50-90 HU, cortical bone
   several hundred to over 1000 HU).
3. Bridge small gaps in the skull (sutures, vessel foramina, thin temporal squama blurred by
   partial volume): dilate the bone with an elliptical element of radius
   ``bridge_radius_mm`` (default 5 mm, converted to pixels per axis), which bridges gaps
   up to about 10 mm whatever the thickness of the bone beside them (a morphological
   closing would not: it erodes a bridge across a gap in thin bone away again).
4. Fill the holes of the grown bone (background 4-connected to the image border is
   outside): the enclosed space, shrunk by the radius. Grow it back by the same radius and
   remove the bone itself. The net effect on the inside is a morphological opening: brain
   regions narrower than about 10 mm between bone ridges are lost; the convex inner surface
   of the skull is followed exactly.
5. Erode by ``erosion_mm`` (default 1 mm) to drop the partial-volume rim against the inner
   table, and drop enclosed pieces smaller than ``min_area_mm2`` (default 100 mm^2:
   diploic spaces, mastoid cells, vessel canals).

Whatever is not enclosed by bone *in the plane of the slice* is outside: the neck, the
shoulders, the scalp and the face always; the skull-base and foramen-magnum slices where the
ring is open; vertex slices where only bone fragments are cut.

Known failure modes (why the setting exists):

* **Craniectomy or large fractures**: where a bone flap is missing the ring is open, the
  whole slice is "outside" and a real hematoma there is removed. Disable the restriction
  (``ICHVOL_INTRACRANIAL_ONLY=false``) for post-operative studies.
* **Skull base and posterior fossa**: low slices where the ring is open (foramen magnum,
  around the petrous bones) lose their brain too: a low cerebellar or brainstem bleed can be
  missed. Enclosed spaces that are not brain are kept on skull-base slices: the orbits (the
  globe and the eye muscles are near blood density), the nasal cavity and sinuses, the
  mastoid air cells, the spinal canal at the foramen magnum.
* **Gaps wider than about twice the bridge radius** (burr holes, thin osteoporotic bone on
  thick slices) open the ring in the same way.
* **Head cut by the field of view**: where the skull runs off the image the ring is open
  at the image border and that slice counts as outside.
* **Dense extracranial material** (metal, a head holder touching the skull) can close a ring
  outside the skull; the space enclosed there is then kept.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import numpy.typing as npt
from scipy import ndimage

from worker.core.ct import MaskArray
from worker.core.errors import ErrorCode, StudyError
from worker.measure.seeded_growth import GrowthSettings, blood_region, grow_from_seeds

__all__ = [
    "DEFAULT_BONE_HU",
    "binarize",
    "ellipse_kernel",
    "enclosed_space",
    "grow_into_blood",
    "intracranial_mask",
    "postprocess",
    "remove_small_components",
]

DEFAULT_BONE_HU = 170.0
DEFAULT_BRIDGE_RADIUS_MM = 5.0
DEFAULT_EROSION_MM = 1.0
DEFAULT_MIN_AREA_MM2 = 100.0
SMOOTHING_SIGMA_MM = 0.5


def _check_spacing(pixel_spacing_mm: tuple[float, float]) -> tuple[float, float]:
    if len(pixel_spacing_mm) != 2:
        raise ValueError(f"pixel_spacing_mm must be (between rows, between columns), got {pixel_spacing_mm!r}")
    row_mm, col_mm = (float(v) for v in pixel_spacing_mm)
    if not (math.isfinite(row_mm) and math.isfinite(col_mm) and row_mm > 0 and col_mm > 0):
        raise StudyError(
            ErrorCode.INVALID_GEOMETRY,
            f"Pixel spacing {row_mm} x {col_mm} mm is not a positive size; check the PixelSpacing of the series.",
        )
    return row_mm, col_mm


def binarize(probabilities: np.ndarray, *, threshold: float) -> MaskArray:
    """1 where ``probabilities > threshold`` (strictly), else 0 (NaN -> 0). Same shape, uint8."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
    with np.errstate(invalid="ignore"):
        out: MaskArray = (np.asarray(probabilities) > threshold).astype(np.uint8)
    return out


def remove_small_components(
    mask: np.ndarray,
    *,
    pixel_spacing_mm: tuple[float, float],
    slab_thickness_mm: np.ndarray,
    min_volume_ml: float,
) -> MaskArray:
    """Drop 3-D connected components (26-connected) smaller than ``min_volume_ml``.

    ``mask``: ``(slices, rows, columns)``, non-zero = hematoma. A component's volume uses
    the slab rule: each of its pixels on slice ``i`` counts ``row_mm * col_mm *
    slab_thickness_mm[i]`` mm^3. Components of exactly ``min_volume_ml`` are kept. Returns
    a new uint8 mask of 0/1.
    """
    if mask.ndim != 3:
        raise ValueError(f"mask must have shape (slices, rows, columns), got shape {mask.shape}")
    row_mm, col_mm = _check_spacing(pixel_spacing_mm)
    slabs = np.asarray(slab_thickness_mm, dtype=np.float64)
    if slabs.shape != (mask.shape[0],):
        raise ValueError(f"slab_thickness_mm must have shape ({mask.shape[0]},), got {slabs.shape}")
    if not min_volume_ml >= 0:
        raise ValueError(f"min_volume_ml must be >= 0, got {min_volume_ml}")
    binary = mask != 0
    if min_volume_ml == 0 or not binary.any():
        unchanged: MaskArray = binary.astype(np.uint8)
        return unchanged
    # Label only the bounding box of the mask: hematomas are small next to the volume.
    box = tuple(slice(int(idx.min()), int(idx.max()) + 1) for idx in np.nonzero(binary))
    labels, n = ndimage.label(binary[box], structure=np.ones((3, 3, 3), dtype=bool))
    # mL per pixel on each slice, broadcast over the labelled voxels.
    ml_per_pixel = slabs[box[0]] * (row_mm * col_mm / 1000.0)
    slice_of_voxel = np.nonzero(labels)[0]
    volumes_ml = np.bincount(labels[labels > 0], weights=ml_per_pixel[slice_of_voxel], minlength=n + 1)
    # Round-off guard: a component of exactly min_volume_ml must not fall below it.
    keep = volumes_ml >= min_volume_ml * (1 - 1e-9)
    keep[0] = False
    kept: MaskArray = np.zeros(mask.shape, dtype=np.uint8)
    kept[box] = keep[labels]
    return kept


def ellipse_kernel(radius_mm: float, row_mm: float, col_mm: float) -> npt.NDArray[np.uint8]:
    ry = max(round(radius_mm / row_mm), 0)
    rx = max(round(radius_mm / col_mm), 0)
    kernel: npt.NDArray[np.uint8] = np.asarray(
        cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * rx + 1, 2 * ry + 1)), dtype=np.uint8
    )
    return kernel


def _intracranial_slice(
    hu: np.ndarray,
    *,
    row_mm: float,
    col_mm: float,
    bone_hu: float,
    bridge: npt.NDArray[np.uint8],
    erosion: npt.NDArray[np.uint8],
    pad: int,
    min_area_px: float,
) -> MaskArray:
    image = np.nan_to_num(np.asarray(hu, dtype=np.float32), nan=-1024.0, posinf=3000.0, neginf=-1024.0)
    smooth = cv2.GaussianBlur(
        image,
        (0, 0),
        sigmaX=SMOOTHING_SIGMA_MM / col_mm,
        sigmaY=SMOOTHING_SIGMA_MM / row_mm,
        borderType=cv2.BORDER_REPLICATE,
    )
    bone = (smooth > bone_hu).astype(np.uint8)
    return enclosed_space(bone, bridge=bridge, erosion=erosion, pad=pad, min_area_px=min_area_px)


def enclosed_space(
    bone: npt.NDArray[np.uint8],
    *,
    bridge: npt.NDArray[np.uint8],
    erosion: npt.NDArray[np.uint8],
    pad: int,
    min_area_px: float,
) -> MaskArray:
    """Steps 3-5 of the intracranial rule on one slice's bone mask ``(rows, columns)`` uint8 0/1.

    Shared with 8-bit images, whose bone comes from the saturated skull ring
    (:mod:`worker.measure.image_skull`) instead of HU.
    """
    if not bone.any():
        return np.zeros(bone.shape, dtype=np.uint8)
    # Pad so that dilation and filling do not treat the image border as a wall.
    padded = cv2.copyMakeBorder(bone, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    # Bridge gaps: grow the bone by the radius. Unlike a closing (which also shrinks back),
    # this bridges a gap of up to twice the radius however thin the bone beside it.
    grown = cv2.dilate(padded, bridge)
    # Flood the outside from the padded corner (4-connected): what it cannot reach is enclosed.
    flood = grown.copy()
    ff_mask = np.zeros((flood.shape[0] + 2, flood.shape[1] + 2), dtype=np.uint8)
    cv2.floodFill(flood, ff_mask, (0, 0), 2, flags=4)
    enclosed = (flood == 0).astype(np.uint8)  # the skull-enclosed space, shrunk by the radius
    # Grow it back by the same radius, then remove the bone itself.
    regrown = np.asarray(cv2.dilate(enclosed, bridge), dtype=np.uint8)[pad:-pad, pad:-pad]
    space: MaskArray = (regrown & (1 - bone)).astype(np.uint8)
    if erosion.size > 1:
        space = np.asarray(cv2.erode(space, erosion, borderType=cv2.BORDER_CONSTANT, borderValue=0), dtype=np.uint8)
    if not space.any():
        return space
    n, labels, stats, _ = cv2.connectedComponentsWithStats(space, connectivity=8)
    keep = np.zeros(n, dtype=bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_area_px
    inside: MaskArray = keep[labels].astype(np.uint8)
    return inside


def intracranial_mask(
    hu: np.ndarray,
    *,
    pixel_spacing_mm: tuple[float, float],
    bone_hu: float = DEFAULT_BONE_HU,
    bridge_radius_mm: float = DEFAULT_BRIDGE_RADIUS_MM,
    erosion_mm: float = DEFAULT_EROSION_MM,
    min_area_mm2: float = DEFAULT_MIN_AREA_MM2,
) -> MaskArray:
    """The skull-enclosed space of each slice, from bone HU (rule and failure modes: module docstring).

    ``hu``: ``(slices, rows, columns)`` HU (float); returns uint8 0/1 of the same shape.
    Each slice is processed on its own, in its own plane.
    """
    if hu.ndim != 3:
        raise ValueError(f"hu must have shape (slices, rows, columns), got shape {hu.shape}")
    row_mm, col_mm = _check_spacing(pixel_spacing_mm)
    bridge = ellipse_kernel(bridge_radius_mm, row_mm, col_mm)
    erosion = ellipse_kernel(erosion_mm, row_mm, col_mm)
    pad = max(bridge.shape) // 2 + 1
    min_area_px = min_area_mm2 / (row_mm * col_mm)
    out = np.zeros(hu.shape, dtype=np.uint8)
    for i in range(hu.shape[0]):
        out[i] = _intracranial_slice(
            hu[i],
            row_mm=row_mm,
            col_mm=col_mm,
            bone_hu=bone_hu,
            bridge=bridge,
            erosion=erosion,
            pad=pad,
            min_area_px=min_area_px,
        )
    return out


def keep_intracranial(
    mask: np.ndarray,
    *,
    hu: np.ndarray,
    pixel_spacing_mm: tuple[float, float],
) -> MaskArray:
    """``mask`` with everything outside the skull-enclosed space removed (uint8 0/1).

    Equal to ``mask & intracranial_mask(hu)`` but computes the skull rule only on the
    slices where ``mask`` has something to remove: most slices of most studies have none.
    """
    out: MaskArray = (np.asarray(mask) != 0).astype(np.uint8)
    busy = np.flatnonzero(out.reshape(out.shape[0], -1).any(axis=1))
    if busy.size:
        out[busy] &= intracranial_mask(hu[busy], pixel_spacing_mm=pixel_spacing_mm)
    return out


def grow_into_blood(
    mask: np.ndarray,
    *,
    probabilities: np.ndarray,
    hu: np.ndarray,
    pixel_spacing_mm: tuple[float, float],
    settings: GrowthSettings,
) -> MaskArray:
    """Seeded growth (:mod:`worker.measure.seeded_growth`) on the slices where ``mask`` has a piece.

    The region growth may enter is blood density in the skull-enclosed space of each of
    those slices, away from bone (``settings.bone_hu``, ``settings.bone_margin_mm``).
    """
    out: MaskArray = (np.asarray(mask) != 0).astype(np.uint8)
    busy = np.flatnonzero(out.reshape(out.shape[0], -1).any(axis=1))
    if not settings.enabled or busy.size == 0:
        return out
    inside = intracranial_mask(hu[busy], pixel_spacing_mm=pixel_spacing_mm)
    region = np.stack(
        [
            blood_region(hu[k], inside=inside[i], pixel_spacing_mm=pixel_spacing_mm, settings=settings)
            for i, k in enumerate(busy)
        ]
    )
    out[busy] = grow_from_seeds(
        out[busy],
        probabilities=probabilities[busy],
        region=region,
        pixel_spacing_mm=pixel_spacing_mm,
        settings=settings,
    )
    return out


def postprocess(
    probabilities: np.ndarray,
    *,
    hu: np.ndarray,
    pixel_spacing_mm: tuple[float, float],
    slab_thickness_mm: np.ndarray,
    threshold: float,
    min_component_ml: float,
    restrict_to_intracranial: bool,
    growth: GrowthSettings | None = None,
) -> MaskArray:
    """The final hematoma mask from model probabilities, in the pipeline's order.

    ``probabilities`` and ``hu``: ``(slices, rows, columns)`` on the native grid. The
    keyword values come from :class:`worker.settings.Settings` (``threshold``,
    ``min_component_ml``, ``restrict_to_intracranial`` and the ``growth_*`` settings);
    ``growth=None`` skips seeded growth. Returns uint8 0/1.
    """
    if probabilities.shape != hu.shape:
        raise ValueError(f"probabilities {probabilities.shape} and hu {hu.shape} must have the same shape")
    mask = binarize(probabilities, threshold=threshold)
    if restrict_to_intracranial:
        mask = keep_intracranial(mask, hu=hu, pixel_spacing_mm=pixel_spacing_mm)
    if growth is not None and growth.enabled:
        mask = grow_into_blood(
            mask, probabilities=probabilities, hu=hu, pixel_spacing_mm=pixel_spacing_mm, settings=growth
        )
    return remove_small_components(
        mask,
        pixel_spacing_mm=pixel_spacing_mm,
        slab_thickness_mm=slab_thickness_mm,
        min_volume_ml=min_component_ml,
    )
