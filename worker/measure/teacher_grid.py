"""The teacher's grid: a CT series reoriented to (superior, posterior, left) and resampled to 1 mm, and back.

Axes and units: the native array is ``(slice, row, column)`` as :class:`worker.core.ct.CtSeries`
(HU, float32); the reoriented array is ``(S, P, L)``: index increases towards the patient's
superior, posterior and left (DICOM LPS), 1 mm apart, origin on the first native voxel along
each reoriented axis. Only the image's own axes are permuted and flipped (the way BLAST-CT's
``reorient_image`` does it), so an oblique series keeps its obliqueness.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from worker.core.ct import CtSeries

SPACING_MM = 1.0


@dataclass(frozen=True)
class ReorientedGrid:
    """How the native array maps onto the 1 mm reoriented volume.

    ``axes[k]``: the native axis that becomes reoriented axis ``k``; ``flips[k]``: whether it
    runs backwards; ``native_mm[k]``: positions (mm, increasing, first = 0) of the native
    voxels along reoriented axis ``k`` after the permutation and flip; ``volume``: float32 HU
    on the 1 mm grid, shape ``(D, H, W)``; ``native_shape``: the native array's shape.
    """

    axes: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    native_mm: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]
    volume: npt.NDArray[np.float32]
    native_shape: tuple[int, int, int]


def native_directions(series: CtSeries) -> npt.NDArray[np.float64]:
    """``(3, 3)``: column ``a`` is the LPS direction of native axis ``a`` (slice, row, column)."""
    return np.stack(
        [series.normal, np.asarray(series.column_cosine, float), np.asarray(series.row_cosine, float)], axis=1
    )


def orientation(series: CtSeries) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """For reoriented axes (S, P, L): the native axis that runs most along each, and whether it runs backwards."""
    directions = native_directions(series)
    axes: list[int] = []
    flips: list[bool] = []
    for lps in (2, 1, 0):  # superior, posterior, left
        weights = np.abs(directions[lps]).copy()
        weights[axes] = -1.0  # each native axis once
        a = int(np.argmax(weights))
        axes.append(a)
        flips.append(bool(directions[lps, a] < 0))
    return (axes[0], axes[1], axes[2]), (flips[0], flips[1], flips[2])


def _native_positions(series: CtSeries) -> list[npt.NDArray[np.float64]]:
    rows, cols = series.hu.shape[1:]
    z = series.positions_mm - series.positions_mm[0]
    return [z, np.arange(rows) * series.pixel_spacing_mm[0], np.arange(cols) * series.pixel_spacing_mm[1]]


def _interp_weights(
    src: npt.NDArray[np.float64], dst: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """For each ``dst`` position: the left source index, the weight of the right one, and whether inside."""
    if len(src) == 1:
        return np.zeros(len(dst), np.intp), np.zeros(len(dst)), np.abs(dst - src[0]) < 1e-6
    left = np.clip(np.searchsorted(src, dst, side="right") - 1, 0, len(src) - 2)
    frac = (dst - src[left]) / (src[left + 1] - src[left])
    inside = (dst >= src[0] - 1e-6) & (dst <= src[-1] + 1e-6)
    return left, np.clip(frac, 0.0, 1.0), inside


def resample_axis(
    array: npt.NDArray[np.float32],
    axis: int,
    src: npt.NDArray[np.float64],
    dst: npt.NDArray[np.float64],
    *,
    nearest: bool,
    fill: float | None,
) -> npt.NDArray[np.float32]:
    """``array`` sampled along ``axis`` at ``dst`` (mm) from samples at ``src`` (mm, increasing).

    Outside ``src``: ``fill``, or the edge sample when ``fill`` is None.
    """
    moved = np.moveaxis(array, axis, 0)
    left, frac, inside = _interp_weights(src, dst)
    if nearest:
        index = np.where(frac >= 0.5, np.minimum(left + 1, len(src) - 1), left)
        out = moved[index].astype(np.float32)
    else:
        right = np.minimum(left + 1, len(src) - 1)
        shape = (-1,) + (1,) * (moved.ndim - 1)
        out = (moved[left] * (1.0 - frac).reshape(shape) + moved[right] * frac.reshape(shape)).astype(np.float32)
    if fill is not None:
        out[~inside] = fill
    return np.moveaxis(out, 0, axis)


def to_reoriented_1mm(series: CtSeries) -> ReorientedGrid:
    """The series reoriented to (S, P, L) and resampled linearly to 1 mm (outside: the image minimum)."""
    axes, flips = orientation(series)
    positions = _native_positions(series)
    volume = np.transpose(series.hu, axes).astype(np.float32)
    native_mm = []
    for k in range(3):
        pos = positions[axes[k]]
        if flips[k]:
            volume = np.flip(volume, axis=k)
            pos = pos[-1] - pos[::-1]
        native_mm.append(np.asarray(pos, dtype=np.float64))
    fill = float(series.hu.min())
    for k in range(3):
        n = round(native_mm[k][-1] / SPACING_MM + 1)  # their get_size_from_spacing (Python rounding)
        volume = resample_axis(
            volume, k, native_mm[k], np.arange(n, dtype=np.float64) * SPACING_MM, nearest=False, fill=fill
        )
    shape = series.hu.shape
    return ReorientedGrid(
        axes=axes,
        flips=flips,
        native_mm=(native_mm[0], native_mm[1], native_mm[2]),
        volume=np.ascontiguousarray(volume, dtype=np.float32),
        native_shape=(int(shape[0]), int(shape[1]), int(shape[2])),
    )


def to_native(array: np.ndarray, grid: ReorientedGrid, *, nearest: bool) -> npt.NDArray[np.float32]:
    """A 1 mm reoriented ``(D, H, W)`` array back on the native grid (nearest or linear).

    Native voxels beyond the 1 mm grid (its last voxel can fall up to half a millimetre short
    of the native extent) take the nearest edge value.
    """
    out = np.asarray(array, dtype=np.float32)
    for k in range(3):
        src = np.arange(out.shape[k], dtype=np.float64) * SPACING_MM
        out = resample_axis(out, k, src, grid.native_mm[k], nearest=nearest, fill=None)
    for k in range(3):
        if grid.flips[k]:
            out = np.flip(out, axis=k)
    inverse = np.argsort(grid.axes)
    return np.ascontiguousarray(np.transpose(out, inverse), dtype=np.float32)
