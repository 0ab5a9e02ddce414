"""Grids and shapes for the synthetic phantom: where each voxel centre lies, in patient mm.

Conventions are those of :mod:`worker.core.ct`: patient coordinates are DICOM LPS in
millimetres (x to the patient's left, y to posterior, z to superior); a series array has
axes ``(slice, row, column)``; pixel ``(k, r, c)`` has its centre at
``IPP_k + c * col_mm * row_cosine + r * row_mm * column_cosine``; slices are sorted by
``position_mm`` (IPP projected on the normal ``row_cosine x column_cosine``), ascending.

A :class:`SampleGrid` holds the x, y and z coordinates of a set of sample points as three
arrays that *broadcast* to the grid's shape (with the gantry tilted about the x axis, x
depends on the column only and y, z on slice and row only), so that shape functions pay
for full-size arrays only where they combine the coordinates. ``SampleGrid.block`` gives
the sub-grid that can contain a sphere, so small structures are evaluated locally.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
Vec3 = tuple[float, float, float]
Mat3 = tuple[Vec3, Vec3, Vec3]

IDENTITY: Mat3 = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))


def slab_thickness_mm(positions_mm: Sequence[float] | npt.NDArray[np.float64], *, single_slice_mm: float) -> F64:
    """Thickness (mm, along the normal) each slice stands for: half the gap to each neighbour.

    ``positions_mm`` are the sorted slice positions along the normal (ascending). End
    slices get their single gap; a lone slice gets ``single_slice_mm`` (its nominal
    thickness). Returns float64 of shape ``(n_slices,)``.
    """
    pos = np.asarray(positions_mm, dtype=np.float64)
    if pos.size == 1:
        return np.array([float(single_slice_mm)])
    gaps = np.diff(pos)
    slab = np.empty_like(pos)
    slab[0] = gaps[0]
    slab[-1] = gaps[-1]
    slab[1:-1] = 0.5 * (gaps[:-1] + gaps[1:])
    return slab


@dataclass(frozen=True)
class PhantomGeometry:
    """The geometry of one axial phantom series (what the DICOM tags say, in sorted order).

    ``image_positions_mm[k]`` is ImagePositionPatient (LPS, mm) of slice ``k`` and
    ``positions_mm[k]`` its projection on the normal (ascending). With gantry tilt ``t``
    the row cosine is ``(1, 0, 0)`` and the column cosine ``(0, cos t, -sin t)``, as on the
    GE scanner; the slice centres move along z (the table), not along the normal.
    ``slab_thickness_mm`` follows :func:`slab_thickness_mm`.
    """

    rows: int
    columns: int
    pixel_spacing_mm: tuple[float, float]  # (between rows, between columns)
    slice_thickness_mm: float  # nominal SliceThickness
    row_cosine: Vec3
    column_cosine: Vec3
    image_positions_mm: tuple[Vec3, ...]
    positions_mm: tuple[float, ...]
    slab_thickness_mm: tuple[float, ...]
    gantry_tilt_deg: float

    @property
    def n_slices(self) -> int:
        return len(self.positions_mm)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.n_slices, self.rows, self.columns)

    @property
    def normal(self) -> F64:
        n = np.cross(np.asarray(self.row_cosine), np.asarray(self.column_cosine))
        return np.asarray(n / np.linalg.norm(n), dtype=np.float64)

    @property
    def voxel_area_mm2(self) -> float:
        return float(self.pixel_spacing_mm[0] * self.pixel_spacing_mm[1])

    def grid(self, start: int = 0, stop: int | None = None) -> SampleGrid:
        """The voxel centres of slices ``start:stop`` (default all) as a :class:`SampleGrid` (float64)."""
        stop = self.n_slices if stop is None else stop
        ipp = np.asarray(self.image_positions_mm[start:stop], dtype=np.float64)  # (S, 3)
        u = np.asarray(self.row_cosine, dtype=np.float64)
        v = np.asarray(self.column_cosine, dtype=np.float64)
        cols = np.arange(self.columns, dtype=np.float64) * self.pixel_spacing_mm[1]
        rows = np.arange(self.rows, dtype=np.float64) * self.pixel_spacing_mm[0]
        coords = []
        for axis in range(3):
            term = _constant_or(ipp[:, axis])[:, None, None]
            if u[axis] != 0.0:
                term = term + (u[axis] * cols)[None, None, :]
            if v[axis] != 0.0:
                term = term + (v[axis] * rows)[None, :, None]
            coords.append(term)
        return SampleGrid(
            x=coords[0],
            y=coords[1],
            z=coords[2],
            shape=(len(ipp), self.rows, self.columns),
            index=_IndexFrame(
                ipp=ipp,
                row_cosine=u,
                column_cosine=v,
                normal=self.normal,
                positions=np.asarray(self.positions_mm[start:stop], dtype=np.float64),
                spacing=self.pixel_spacing_mm,
            ),
        )


def _constant_or(values: F64) -> F64:
    """Values of shape (S,), or one value of shape (1,) when all are equal (keeps arrays small)."""
    if values.size and np.all(values == values[0]):
        return values[:1].copy()
    return values


@dataclass(frozen=True)
class _IndexFrame:
    ipp: F64
    row_cosine: F64
    column_cosine: F64
    normal: F64
    positions: F64
    spacing: tuple[float, float]


def _take(array: F64, index: tuple[slice, ...]) -> F64:
    """Slice a broadcastable array: axes of length 1 are kept whole."""
    parts = tuple(slice(None) if array.shape[i] == 1 else s for i, s in enumerate(index))
    return array[parts]


@dataclass(frozen=True)
class SampleGrid:
    """Patient coordinates (LPS, mm) of sample points: ``x``, ``y``, ``z`` broadcast to ``shape``."""

    x: npt.NDArray[np.floating]
    y: npt.NDArray[np.floating]
    z: npt.NDArray[np.floating]
    shape: tuple[int, ...]
    index: _IndexFrame | None = field(default=None, repr=False)

    @classmethod
    def from_points(cls, points_mm: npt.ArrayLike) -> SampleGrid:
        """A grid of arbitrary points, ``points_mm`` of shape ``(..., 3)`` (LPS, mm)."""
        p = np.asarray(points_mm, dtype=np.float64)
        return cls(x=p[..., 0], y=p[..., 1], z=p[..., 2], shape=p.shape[:-1])

    def astype(self, dtype: type[np.floating]) -> SampleGrid:
        return SampleGrid(
            x=self.x.astype(dtype),
            y=self.y.astype(dtype),
            z=self.z.astype(dtype),
            shape=self.shape,
            index=self.index,
        )

    def block(self, center_mm: Sequence[float], radius_mm: float) -> tuple[tuple[slice, ...], SampleGrid] | None:
        """The index box and sub-grid holding every point within ``radius_mm`` of ``center_mm``.

        The box may hold more points than the ball, never fewer. ``None`` when no point
        can be inside. Grids built from points (no index frame) return themselves whole.
        """
        if self.index is None:
            return tuple(slice(None) for _ in self.shape), self
        f = self.index
        c = np.asarray(center_mm, dtype=np.float64)
        s_c = float(c @ f.normal)
        k0 = int(np.searchsorted(f.positions, s_c - radius_mm, side="left"))
        k1 = int(np.searchsorted(f.positions, s_c + radius_mm, side="right"))
        if k1 <= k0:
            return None
        rel = c[None, :] - f.ipp[k0:k1]
        col_c = rel @ f.row_cosine / f.spacing[1]
        row_c = rel @ f.column_cosine / f.spacing[0]
        r0 = max(math.floor(float(row_c.min()) - radius_mm / f.spacing[0]), 0)
        r1 = min(math.ceil(float(row_c.max()) + radius_mm / f.spacing[0]) + 1, self.shape[1])
        c0 = max(math.floor(float(col_c.min()) - radius_mm / f.spacing[1]), 0)
        c1 = min(math.ceil(float(col_c.max()) + radius_mm / f.spacing[1]) + 1, self.shape[2])
        if r1 <= r0 or c1 <= c0:
            return None
        index = (slice(k0, k1), slice(r0, r1), slice(c0, c1))
        sub = SampleGrid(
            x=_take(np.asarray(self.x, np.float64), index),
            y=_take(np.asarray(self.y, np.float64), index),
            z=_take(np.asarray(self.z, np.float64), index),
            shape=(k1 - k0, r1 - r0, c1 - c0),
        )
        if self.x.dtype != np.float64:
            sub = sub.astype(self.x.dtype.type)
        return index, sub


def rotation_from_angles(yaw: float, pitch: float, roll: float) -> Mat3:
    """A rotation matrix (rows of a 3x3) from Z-Y-X Euler angles in radians."""
    cz, sz = math.cos(yaw), math.sin(yaw)
    cy, sy = math.cos(pitch), math.sin(pitch)
    cx, sx = math.cos(roll), math.sin(roll)
    rz = np.array([[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]])
    ry = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]])
    m = rz @ ry @ rx
    return _mat3(m)


def _mat3(m: npt.ArrayLike) -> Mat3:
    a = np.asarray(m, dtype=np.float64)
    return (
        (float(a[0, 0]), float(a[0, 1]), float(a[0, 2])),
        (float(a[1, 0]), float(a[1, 1]), float(a[1, 2])),
        (float(a[2, 0]), float(a[2, 1]), float(a[2, 2])),
    )


@dataclass(frozen=True)
class Ellipsoid:
    """A solid ellipsoid in patient coordinates (LPS, mm).

    ``rotation`` is a 3x3 matrix whose *columns* are the principal axes (unit vectors in
    LPS) belonging to ``semi_axes_mm``. A point ``p`` is inside when
    ``(p - c)^T M (p - c) <= 1`` with ``M = R diag(1/a^2) R^T``.
    """

    center_mm: Vec3
    semi_axes_mm: Vec3
    rotation: Mat3 = IDENTITY

    @property
    def volume_mm3(self) -> float:
        a, b, c = self.semi_axes_mm
        return 4.0 / 3.0 * math.pi * a * b * c

    @property
    def bounding_radius_mm(self) -> float:
        return max(self.semi_axes_mm)

    def form(self) -> F64:
        r = np.asarray(self.rotation, dtype=np.float64)
        inv = np.diag(1.0 / np.asarray(self.semi_axes_mm, dtype=np.float64) ** 2)
        return np.asarray(r @ inv @ r.T, dtype=np.float64)

    def level(self, grid: SampleGrid) -> npt.NDArray[np.floating]:
        """``(p - c)^T M (p - c)`` at the grid points (1 on the surface), broadcast to the grid."""
        m = self.form()
        dx = grid.x - self.center_mm[0]
        dy = grid.y - self.center_mm[1]
        dz = grid.z - self.center_mm[2]
        if self.rotation == IDENTITY:
            return np.asarray(dx * dx * m[0, 0] + dy * dy * m[1, 1] + dz * dz * m[2, 2])
        return np.asarray(
            dx * dx * m[0, 0]
            + dy * dy * m[1, 1]
            + dz * dz * m[2, 2]
            + 2.0 * (dx * dy * m[0, 1] + dx * dz * m[0, 2] + dy * dz * m[1, 2])
        )

    def contains(self, grid: SampleGrid) -> BoolArray:
        return np.broadcast_to(self.level(grid) <= 1.0, grid.shape)

    def z_interval(self, x: F64, y: F64) -> tuple[F64, F64]:
        """The z range (mm) of the ellipsoid on vertical lines through ``(x, y)``.

        Returns ``(lo, hi)``; lines that miss get ``lo = +inf, hi = -inf``.
        """
        m = self.form()
        dx = x - self.center_mm[0]
        dy = y - self.center_mm[1]
        a = m[2, 2]
        b = m[0, 2] * dx + m[1, 2] * dy
        c = m[0, 0] * dx * dx + 2.0 * m[0, 1] * dx * dy + m[1, 1] * dy * dy - 1.0
        disc = b * b - a * c
        hit = disc > 0.0
        root = np.sqrt(np.where(hit, disc, 0.0))
        lo = np.where(hit, (-b - root) / a + self.center_mm[2], np.inf)
        hi = np.where(hit, (-b + root) / a + self.center_mm[2], -np.inf)
        return lo, hi

    def xy_box(self) -> tuple[float, float, float, float]:
        """Exact axis-aligned extent in x and y: ``(xmin, xmax, ymin, ymax)``."""
        inv = np.linalg.inv(self.form())
        hx = math.sqrt(inv[0, 0])
        hy = math.sqrt(inv[1, 1])
        return (
            self.center_mm[0] - hx,
            self.center_mm[0] + hx,
            self.center_mm[1] - hy,
            self.center_mm[1] + hy,
        )

    def surface_points(self, n: int = 1200) -> F64:
        """``n`` points spread over the surface (Fibonacci lattice), shape ``(n, 3)``, LPS mm."""
        unit = fibonacci_sphere(n)
        r = np.asarray(self.rotation, dtype=np.float64)
        local = unit * np.asarray(self.semi_axes_mm)[None, :]
        return np.asarray(local @ r.T + np.asarray(self.center_mm)[None, :], dtype=np.float64)

    def scaled(self, factor: float, *, about: Sequence[float] = (0.0, 0.0, 0.0)) -> Ellipsoid:
        """This ellipsoid scaled by ``factor`` about the point ``about`` (volume times factor^3)."""
        o = np.asarray(about, dtype=np.float64)
        c = o + factor * (np.asarray(self.center_mm) - o)
        return Ellipsoid(
            center_mm=_vec3(c),
            semi_axes_mm=_vec3(np.asarray(self.semi_axes_mm) * factor),
            rotation=self.rotation,
        )

    def translated(self, offset_mm: Sequence[float]) -> Ellipsoid:
        c = np.asarray(self.center_mm) + np.asarray(offset_mm, dtype=np.float64)
        return Ellipsoid(center_mm=_vec3(c), semi_axes_mm=self.semi_axes_mm, rotation=self.rotation)

    def dilated(self, margin_mm: float) -> Ellipsoid:
        """The ellipsoid with every semi-axis longer by ``margin_mm`` (a shell, not an exact offset)."""
        return Ellipsoid(
            center_mm=self.center_mm,
            semi_axes_mm=_vec3(np.asarray(self.semi_axes_mm) + margin_mm),
            rotation=self.rotation,
        )


def _vec3(a: npt.ArrayLike) -> Vec3:
    v = np.asarray(a, dtype=np.float64)
    return (float(v[0]), float(v[1]), float(v[2]))


def fibonacci_sphere(n: int) -> F64:
    """``n`` nearly uniform unit vectors, shape ``(n, 3)``."""
    i = np.arange(n, dtype=np.float64) + 0.5
    z = 1.0 - 2.0 * i / n
    r = np.sqrt(np.maximum(0.0, 1.0 - z * z))
    phi = i * math.pi * (3.0 - math.sqrt(5.0))
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def union_length(lo: F64, hi: F64) -> F64:
    """Length of the union of intervals ``[lo[i], hi[i]]`` on each line.

    ``lo`` and ``hi`` have shape ``(n_intervals, n_lines)``; empty intervals carry
    ``lo = +inf, hi = -inf``. Returns shape ``(n_lines,)``.
    """
    order = np.argsort(lo, axis=0)
    lo_s = np.take_along_axis(lo, order, axis=0)
    hi_s = np.take_along_axis(hi, order, axis=0)
    total = np.zeros(lo.shape[1], dtype=np.float64)
    cur_lo = lo_s[0].copy()
    cur_hi = hi_s[0].copy()
    for i in range(1, lo.shape[0]):
        gap = lo_s[i] > cur_hi
        total += np.where(gap, np.maximum(cur_hi - cur_lo, 0.0), 0.0)
        cur_lo = np.where(gap, lo_s[i], cur_lo)
        cur_hi = np.where(gap, hi_s[i], np.maximum(cur_hi, hi_s[i]))
    total += np.maximum(cur_hi - cur_lo, 0.0)
    # Empty intervals (inf - inf) would give nan; they only ever reach the np.maximum above
    # as (+inf, -inf) pairs, which give -inf -> 0.
    return np.nan_to_num(total, nan=0.0, posinf=0.0)


def ellipsoid_union_volume_mm3(
    ellipsoids: Sequence[Ellipsoid],
    *,
    step_mm: float = 0.1,
    y_min_mm: float | None = None,
    excluded: Sequence[Ellipsoid] = (),
) -> float:
    """Volume (mm^3) of ``union(ellipsoids) minus union(excluded)``, cut to ``y >= y_min_mm``.

    The integral runs along z exactly (each ellipsoid meets a vertical line in one
    interval, found in closed form) and by the midpoint rule on an ``(x, y)`` lattice of
    ``step_mm``; with a y cut, the lattice starts at the cut so no cell straddles it. It is
    independent of any output grid. Against closed-form ellipsoids of 1 to 100 mL the
    error at 0.1 mm is below 0.02 % (see tests/worker/synth/test_phantom.py).
    """
    _, volumes = ellipsoid_union_row_volumes(ellipsoids, step_mm=step_mm, y_min_mm=y_min_mm, excluded=excluded)
    return float(volumes.sum())


def ellipsoid_union_row_volumes(
    ellipsoids: Sequence[Ellipsoid],
    *,
    step_mm: float,
    y_min_mm: float | None = None,
    excluded: Sequence[Ellipsoid] = (),
    chunk_lines: int = 400_000,
) -> tuple[F64, F64]:
    """Row centres ``y`` (mm) and the volume (mm^3) of each ``step_mm`` slab of rows, ascending in y.

    See :func:`ellipsoid_union_volume_mm3`; the cumulative sum from the top gives the volume
    behind any level without integrating again.
    """
    if not ellipsoids:
        return np.zeros(0), np.zeros(0)
    boxes = np.array([e.xy_box() for e in ellipsoids])
    x0, x1 = float(boxes[:, 0].min()), float(boxes[:, 1].max())
    y0, y1 = float(boxes[:, 2].min()), float(boxes[:, 3].max())
    if y_min_mm is not None:
        y0 = max(y0, y_min_mm)
        if y1 <= y0:
            return np.zeros(0), np.zeros(0)
    nx = max(math.ceil((x1 - x0) / step_mm), 1)
    ny = max(math.ceil((y1 - y0) / step_mm), 1)
    xs = x0 + (np.arange(nx) + 0.5) * step_mm
    ys: F64 = np.asarray(y0 + (np.arange(ny) + 0.5) * step_mm, dtype=np.float64)
    rows_per_chunk = max(chunk_lines // nx, 1)
    volumes = np.zeros(ny)
    for j0 in range(0, ny, rows_per_chunk):
        yy, xx = np.meshgrid(ys[j0 : j0 + rows_per_chunk], xs, indexing="ij")
        x = xx.ravel()
        y = yy.ravel()
        inc = [e.z_interval(x, y) for e in ellipsoids]
        lo = np.stack([i[0] for i in inc])
        hi = np.stack([i[1] for i in inc])
        length = union_length(lo, hi)
        if excluded:
            exc = [e.z_interval(x, y) for e in excluded]
            lo_e = np.stack([i[0] for i in exc])
            hi_e = np.stack([i[1] for i in exc])
            both = union_length(np.concatenate([lo, lo_e]), np.concatenate([hi, hi_e]))
            length = both - union_length(lo_e, hi_e)
        volumes[j0 : j0 + yy.shape[0]] = length.reshape(yy.shape).sum(axis=1) * step_mm * step_mm
    return ys, volumes
