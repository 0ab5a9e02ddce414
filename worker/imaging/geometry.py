"""Slice geometry in patient coordinates: pure numpy, no DICOM parsing.

Conventions (the same as :mod:`worker.core.ct`)
-----------------------------------------
* Patient coordinates are DICOM LPS in millimetres: x to the patient's left, y to
  posterior, z to superior.
* ``row_cosine`` is ImageOrientationPatient[0:3], the direction of increasing column
  index; ``column_cosine`` is ImageOrientationPatient[3:6], the direction of increasing
  row index. ``pixel_spacing_mm`` is the DICOM PixelSpacing order
  ``(between rows, between columns)``.
* The slice normal is ``row_cosine x column_cosine`` (unit length). Slice positions are
  ImagePositionPatient (the centre of the first transmitted pixel, row 0 column 0)
  projected on that normal, in mm. With gantry tilt the slice origins are not stacked
  along the normal, but the normal is still the axis along which parallel slice planes
  are separated, so gaps and slab thicknesses are measured along it.
* Series arrays are ``(slice, row, column)``. NIfTI arrays written by this project are
  the same data transposed to ``(column, row, slice)``: voxel index ``(i, j, k)`` is
  column ``i``, row ``j``, slice ``k``. The affines below follow that order exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from worker.core.errors import ErrorCode, StudyError

if TYPE_CHECKING:
    from worker.core.ct import CtSeries

Float64Array = npt.NDArray[np.float64]

#: Largest deviation from unit length / orthogonality accepted for direction cosines.
COSINE_TOLERANCE = 1e-2
#: Gaps along the normal that differ by less than this (mm) count as even.
EVEN_GAP_TOLERANCE_MM = 0.01

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def slice_normal(row_cosine: npt.ArrayLike, column_cosine: npt.ArrayLike) -> Float64Array:
    """The unit slice normal ``row_cosine x column_cosine`` in LPS, shape ``(3,)``, float64.

    Raises :class:`StudyError` (``INVALID_GEOMETRY``) when the cosines are not finite,
    not of unit length or not orthogonal (within :data:`COSINE_TOLERANCE`).
    """
    row = np.asarray(row_cosine, dtype=np.float64)
    col = np.asarray(column_cosine, dtype=np.float64)
    if row.shape != (3,) or col.shape != (3,) or not (np.all(np.isfinite(row)) and np.all(np.isfinite(col))):
        raise StudyError(ErrorCode.INVALID_GEOMETRY, "ImageOrientationPatient is not six finite numbers")
    if (
        abs(np.linalg.norm(row) - 1.0) > COSINE_TOLERANCE
        or abs(np.linalg.norm(col) - 1.0) > COSINE_TOLERANCE
        or abs(float(row @ col)) > COSINE_TOLERANCE
    ):
        raise StudyError(
            ErrorCode.INVALID_GEOMETRY,
            "ImageOrientationPatient is not two orthogonal unit vectors",
        )
    normal = np.cross(row, col)
    return normal / np.linalg.norm(normal)


def project_positions(image_positions_mm: npt.ArrayLike, normal: npt.ArrayLike) -> Float64Array:
    """Project ImagePositionPatient vectors on the slice normal.

    ``image_positions_mm``: shape ``(n, 3)``, LPS mm. ``normal``: shape ``(3,)``, unit.
    Returns shape ``(n,)`` float64: the signed distance (mm) of each slice plane from the
    plane through the origin, along ``normal``.
    """
    positions = np.asarray(image_positions_mm, dtype=np.float64).reshape(-1, 3)
    return positions @ np.asarray(normal, dtype=np.float64)


def slab_thicknesses(positions_mm: npt.ArrayLike) -> Float64Array:
    """Thickness (mm) of the slab each slice stands for, along the normal.

    ``positions_mm``: shape ``(n,)``, n >= 2, strictly ascending (see
    :func:`project_positions`). Slice ``i`` represents the slab from halfway to its lower
    neighbour to halfway to its upper neighbour, so an interior slice has
    ``(gap[i-1] + gap[i]) / 2``; an end slice has its single neighbouring gap. With even
    spacing every value equals the spacing; the sum is ``span + (gap[0] + gap[-1]) / 2``.
    Returns shape ``(n,)`` float64.
    """
    positions = np.asarray(positions_mm, dtype=np.float64)
    if positions.ndim != 1 or positions.size < 2:
        raise ValueError("slab_thicknesses needs at least two positions")
    gaps = np.diff(positions)
    if not np.all(gaps > 0):
        raise ValueError("positions must be strictly ascending")
    slabs = np.empty_like(positions)
    slabs[0] = gaps[0]
    slabs[-1] = gaps[-1]
    slabs[1:-1] = (gaps[:-1] + gaps[1:]) / 2.0
    return slabs


def tilt_deg(normal: npt.ArrayLike) -> float:
    """Angle (degrees, 0 to 90) between the slice normal and the patient z axis.

    An axial slice has 0; a gantry-tilted axial slice has the gantry tilt; sagittal and
    coronal slices have 90. The sign of the normal does not matter.
    """
    n = np.asarray(normal, dtype=np.float64)
    n = n / np.linalg.norm(n)
    return float(np.degrees(np.arccos(np.clip(abs(n[2]), 0.0, 1.0))))


def uneven_spacing_warning(positions_mm: npt.ArrayLike, *, tolerance_mm: float = EVEN_GAP_TOLERANCE_MM) -> str | None:
    """A warning when the gaps between sorted slice positions (mm) are not all equal.

    Volumes use per-slice slab thicknesses and stay exact; a NIfTI affine can hold only
    one slice step, so the message says the NIfTI file uses the mean step.
    """
    positions = np.asarray(positions_mm, dtype=np.float64)
    if positions.size < 3:
        return None
    gaps = np.diff(positions)
    if float(gaps.max() - gaps.min()) <= tolerance_mm:
        return None
    return (
        f"uneven slice gaps along the normal ({gaps.min():.2f} to {gaps.max():.2f} mm): volumes use "
        f"per-slice slab thicknesses; the NIfTI affine uses the mean step ({gaps.mean():.2f} mm)"
    )


def voxel_to_lps_affine(
    *,
    first_position_mm: Sequence[float],
    last_position_mm: Sequence[float],
    n_slices: int,
    row_cosine: Sequence[float],
    column_cosine: Sequence[float],
    pixel_spacing_mm: tuple[float, float],
    single_slice_thickness_mm: float | None = None,
) -> Float64Array:
    """4x4 affine from voxel index ``(i, j, k, 1)`` to LPS mm, with i=column, j=row, k=slice.

    * column ``i`` steps ``pixel_spacing_mm[1] * row_cosine``;
    * row ``j`` steps ``pixel_spacing_mm[0] * column_cosine``;
    * slice ``k`` steps ``(last_position_mm - first_position_mm) / (n_slices - 1)``, the
      mean step between the ImagePositionPatient of the first and last sorted slices (with
      gantry tilt this vector is not along the normal: the affine is sheared, as the data);
    * voxel ``(0, 0, 0)`` is ``first_position_mm``, the centre of the first pixel of the
      first sorted slice.

    A single slice has no step: ``single_slice_thickness_mm`` along the normal is used.
    Returns float64, shape ``(4, 4)``.
    """
    first = np.asarray(first_position_mm, dtype=np.float64)
    last = np.asarray(last_position_mm, dtype=np.float64)
    row = np.asarray(row_cosine, dtype=np.float64)
    col = np.asarray(column_cosine, dtype=np.float64)
    if n_slices >= 2:
        step = (last - first) / (n_slices - 1)
    elif n_slices == 1 and single_slice_thickness_mm is not None:
        step = slice_normal(row, col) * float(single_slice_thickness_mm)
    else:
        raise ValueError("one slice needs single_slice_thickness_mm; zero slices have no affine")
    affine = np.eye(4)
    affine[:3, 0] = row * float(pixel_spacing_mm[1])
    affine[:3, 1] = col * float(pixel_spacing_mm[0])
    affine[:3, 2] = step
    affine[:3, 3] = first
    return affine


def lps_to_ras(affine_lps: npt.ArrayLike) -> Float64Array:
    """Turn a voxel-to-LPS affine into voxel-to-RAS (NIfTI): negate the x and y rows."""
    return _LPS_TO_RAS @ np.asarray(affine_lps, dtype=np.float64)


def nifti_affine(series: CtSeries) -> Float64Array:
    """The NIfTI (RAS mm) affine of ``series`` for data stored as ``(column, row, slice)``.

    The NIfTI array is the series' ``(slice, row, column)`` array (or a mask on that grid)
    transposed with ``array.transpose(2, 1, 0)``: voxel ``(i, j, k)`` is column ``i``, row
    ``j`` of sorted slice ``k``. The affine maps it to RAS mm: LPS from
    :func:`voxel_to_lps_affine` with x and y negated. With uneven gaps the slice step is the
    mean step (the loader records a warning in ``series.warnings``); volumes never use this
    affine, they use ``series.slab_thickness_mm``.
    """
    slices = series.slices
    lps = voxel_to_lps_affine(
        first_position_mm=slices[0].image_position_mm,
        last_position_mm=slices[-1].image_position_mm,
        n_slices=len(slices),
        row_cosine=series.row_cosine,
        column_cosine=series.column_cosine,
        pixel_spacing_mm=series.pixel_spacing_mm,
        single_slice_thickness_mm=float(series.slab_thickness_mm[0]) if len(slices) == 1 else None,
    )
    return lps_to_ras(lps)
