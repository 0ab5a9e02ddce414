"""Rendering a phantom in memory: slice positions, geometry, HU with blur and noise, labels.

Arrays have axes ``(slice, row, column)`` with slices sorted by position along the normal
(ascending); HU are float32; patient coordinates are LPS mm (see :mod:`worker.core.ct`).
Random streams are derived from the seed and a stream number, so the head and lesions
(streams 1, 2) do not depend on the grid and one seed gives the same head on any geometry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from worker.synth.phantom.anatomy import HeadModel
from worker.synth.phantom.geometry import PhantomGeometry, SampleGrid, slab_thickness_mm
from worker.synth.phantom.lesions import Lesion
from worker.synth.phantom.placement import build_lesions
from worker.synth.phantom.spec import DEFAULT_SLICES, MAX_VOXELS, PhantomSpec

# Independent random streams: the head and lesions do not depend on the grid, so one
# seed gives the same head and lesions on any geometry.
STREAM_HEAD, STREAM_LESIONS, STREAM_GAPS, STREAM_NOISE = 1, 2, 3, 4
STREAM_NOISE_THIN, STREAM_NOISE_SCOUT, STREAM_FILES = 5, 6, 7


@dataclass(frozen=True)
class RenderedPhantom:
    """A phantom in memory: HU, hematoma labels and geometry of one axial series.

    ``hu``: float32 HU, shape ``(slices, rows, columns)``, slices sorted by position along
    the normal (ascending). ``labels``: uint8 of the same shape, 0 background, ``i + 1``
    for ``lesions[i]``. ``lesions``: the truth record of each lesion (``describe()`` plus
    ``mask_volume_ml``).
    """

    hu: npt.NDArray[np.float32]
    labels: npt.NDArray[np.uint8]
    geometry: PhantomGeometry
    head: HeadModel
    lesion_shapes: tuple[Lesion, ...]
    lesions: tuple[dict[str, Any], ...]
    analytic_volume_ml: float
    mask_volume_ml: float

    @property
    def mask(self) -> npt.NDArray[np.uint8]:
        return (self.labels > 0).astype(np.uint8)


# ---------------------------------------------------------------------------------------
# Geometry


def stream_rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, stream])


def slice_positions_mm(spec: PhantomSpec, *, head: HeadModel, tilt_rad: float, seed: int) -> npt.NDArray[np.float64]:
    """Slice positions along the normal (ascending), mm."""
    if spec.gaps_mm is not None:
        gaps = np.asarray(spec.gaps_mm, dtype=np.float64)
    elif spec.uneven:
        n = spec.n_slices or DEFAULT_SLICES
        gaps = stream_rng(seed, STREAM_GAPS).uniform(*spec.uneven_gap_range_mm, size=max(n - 1, 0))
    else:
        spacing = spec.slice_spacing_mm or spec.slice_thickness_mm
        if spec.z_range_mm is not None:
            n_fit = math.floor((spec.z_range_mm[1] - spec.z_range_mm[0]) / spacing + 1e-6) + 1
            if spec.n_slices is not None and spec.n_slices != n_fit:
                raise ValueError(f"n_slices={spec.n_slices} disagrees with z_range_mm at {spacing} mm: {n_fit}")
            n = n_fit
        else:
            n = spec.n_slices or DEFAULT_SLICES
        gaps = np.full(max(n - 1, 0), spacing)
    if spec.z_range_mm is not None:
        start = spec.z_range_mm[0]
    elif spec.first_position_mm is not None:
        start = spec.first_position_mm
    else:
        # Centre the stack a little above the head centre (the vertex is further than the base).
        c = head.inner_table.center_mm
        s = head.inner_table.semi_axes_mm
        mid_z = c[2] + 0.5 * (s[5] - s[4])
        start = c[1] * math.sin(tilt_rad) + mid_z * math.cos(tilt_rad) - 0.5 * float(gaps.sum())
    return np.asarray(start + np.concatenate([[0.0], np.cumsum(gaps)]), dtype=np.float64)


def build_geometry(spec: PhantomSpec, *, positions_mm: npt.NDArray[np.float64]) -> PhantomGeometry:
    """The axial series: slice centres on the table axis through ``recon_center_mm``, planes tilted.

    Slice ``k`` has its image centre at ``(rx, ry, z_k)`` with ``z_k`` chosen so the plane
    lies at ``positions_mm[k]`` along the normal ``(0, sin t, cos t)``.
    """
    n_voxels = len(positions_mm) * spec.rows * spec.columns
    if n_voxels > MAX_VOXELS:
        raise ValueError(f"{n_voxels} voxels is too many for one phantom series (limit {MAX_VOXELS})")
    t = math.radians(spec.gantry_tilt_deg)
    u = np.array([1.0, 0.0, 0.0])
    v = np.array([0.0, math.cos(t), -math.sin(t)])
    dr, dc = spec.pixel_spacing_mm
    rx, ry = spec.recon_center_mm
    ipps = []
    for s in positions_mm:
        z = (float(s) - ry * math.sin(t)) / math.cos(t)
        centre = np.array([rx, ry, z])
        ipp = centre - 0.5 * (spec.columns - 1) * dc * u - 0.5 * (spec.rows - 1) * dr * v
        ipps.append((float(ipp[0]), float(ipp[1]), float(ipp[2])))
    return PhantomGeometry(
        rows=spec.rows,
        columns=spec.columns,
        pixel_spacing_mm=(float(dr), float(dc)),
        slice_thickness_mm=float(spec.slice_thickness_mm),
        row_cosine=(1.0, 0.0, 0.0),
        column_cosine=(0.0, float(v[1]), float(v[2])),
        image_positions_mm=tuple(ipps),
        positions_mm=tuple(float(p) for p in positions_mm),
        slab_thickness_mm=tuple(
            float(x) for x in slab_thickness_mm(positions_mm, single_slice_mm=spec.slice_thickness_mm)
        ),
        gantry_tilt_deg=float(spec.gantry_tilt_deg),
    )


# ---------------------------------------------------------------------------------------
# Rendering


def _gaussian_kernel(sigma_px: float) -> npt.NDArray[np.float32]:
    radius = max(math.ceil(3.0 * sigma_px), 1)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma_px) ** 2)
    kernel: npt.NDArray[np.float32] = (k / k.sum()).astype(np.float32)
    return kernel


def _convolve_axis(a: npt.NDArray[np.float32], kernel: npt.NDArray[np.float32], axis: int) -> npt.NDArray[np.float32]:
    """Separable convolution along ``axis`` with edge values repeated (no darkening at borders)."""
    r = len(kernel) // 2
    pad = [(0, 0)] * a.ndim
    pad[axis] = (r, r)
    padded = np.pad(a, pad, mode="edge")
    n = a.shape[axis]
    out = np.zeros_like(a)
    for i, w in enumerate(kernel):
        out += w * _slice_axis(padded, axis, i, n)
    return out


def _slice_axis(a: npt.NDArray[np.float32], axis: int, start: int, n: int) -> npt.NDArray[np.float32]:
    index = [slice(None)] * a.ndim
    index[axis] = slice(start, start + n)
    return a[tuple(index)]


def blur_in_plane(
    volume: npt.NDArray[np.float32], *, sigma_mm: float, pixel_spacing_mm: tuple[float, float]
) -> tuple[npt.NDArray[np.float32], float]:
    """Gaussian blur of each slice (axes 1, 2) with ``sigma_mm``; returns it and the kernel's L2 norm."""
    norm = 1.0
    out = volume
    for axis, spacing in ((1, pixel_spacing_mm[0]), (2, pixel_spacing_mm[1])):
        sigma_px = sigma_mm / spacing
        if sigma_px < 0.2:
            continue
        kernel = _gaussian_kernel(sigma_px)
        norm *= float(np.sqrt(np.sum(kernel.astype(np.float64) ** 2)))
        out = _convolve_axis(out, kernel, axis)
    return out, norm


def shifted_grid(grid: SampleGrid, offset_mm: float) -> SampleGrid:
    """The same voxel centres moved ``offset_mm`` along the slice normal (partial volume in z)."""
    if grid.index is None or offset_mm == 0.0:
        return grid
    n = grid.index.normal
    frame = replace(
        grid.index,
        ipp=grid.index.ipp + offset_mm * n[None, :],
        positions=grid.index.positions + offset_mm,
    )
    return SampleGrid(
        x=grid.x + offset_mm * n[0],
        y=grid.y + offset_mm * n[1],
        z=grid.z + offset_mm * n[2],
        shape=grid.shape,
        index=frame,
    )


def mass_effect_grid(grid: SampleGrid, *, head: HeadModel, lesions: tuple[Lesion, ...], strength: float) -> SampleGrid:
    """Where each voxel's *normal* anatomy comes from when the hematomas push the brain aside.

    Each lesion (not intraventricular blood, which fills a space) of volume ``V`` acts as an
    incompressible expansion: points at distance ``r`` from its centre move outward by
    ``strength * R^3 / (3 r^2)`` (``R`` the radius of a sphere of volume ``V``; linear inside
    ``R``), faded to nothing within 15 mm of the inner table so the skull never moves. The
    returned grid samples the head at ``p - u(p)`` (no index frame: the lesion shapes and
    labels stay on the true grid, so the truth is unchanged).
    """
    ux = np.zeros(grid.shape, dtype=np.float64)
    uy = np.zeros(grid.shape, dtype=np.float64)
    uz = np.zeros(grid.shape, dtype=np.float64)
    x, y, z = (np.broadcast_to(a, grid.shape) for a in (grid.x, grid.y, grid.z))
    for lesion in lesions:
        if lesion.kind == "intraventricular" or lesion.analytic_volume_ml <= 0:
            continue
        radius = (3.0 * lesion.analytic_volume_ml * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)
        c = lesion.center_mm
        dx, dy, dz = x - c[0], y - c[1], z - c[2]
        r = np.sqrt(dx * dx + dy * dy + dz * dz) + 1e-6
        mag = strength * np.where(r > radius, radius**3 / (3.0 * r * r), r / 3.0)
        ux += mag * dx / r
        uy += mag * dy / r
        uz += mag * dz / r
    weight = np.clip(np.broadcast_to(head.inner_table.depth_mm(grid), grid.shape) / 15.0, 0.0, 1.0)
    return SampleGrid(x=x - weight * ux, y=y - weight * uy, z=z - weight * uz, shape=grid.shape)


def _paint_lesions(
    grid: SampleGrid, hu: npt.NDArray[np.float32], *, head: HeadModel, lesions: tuple[Lesion, ...]
) -> npt.NDArray[np.uint8]:
    """Edema rims, then blood, into ``hu`` (in place); returns the lesion labels at the grid points."""
    labels = np.zeros(grid.shape, dtype=np.uint8)
    # The rim reaches rim_mm beyond the lesion (semi-axes grow by rim_mm).
    blocks = [grid.block(lesion.center_mm, lesion.bounding_radius_mm + lesion.rim_mm + 0.5) for lesion in lesions]
    inside: list[npt.NDArray[np.bool_] | None] = []
    for lesion, found in zip(lesions, blocks, strict=True):
        inside.append(None if found is None else lesion.contains(found[1]))
    # Edema rims first (only in brain tissue: not CSF spaces, ventricles, calcifications),
    # then blood, so a rim never covers blood.
    for lesion, found, own in zip(lesions, blocks, inside, strict=True):
        if found is None or own is None:
            continue
        index, sub = found
        rim = lesion.rim_contains(sub)
        if rim is None:
            continue
        tissue = (
            (head.intracranial_depth_mm(sub) > head.csf_mm) & ~head.ventricle_mask(sub) & ~head.calcification_mask(sub)
        )
        hu[index][rim & ~own & tissue] = lesion.rim_hu
    for i, (lesion, found, own) in enumerate(zip(lesions, blocks, inside, strict=True)):
        if found is None or own is None:
            continue
        index, sub = found
        hu[index][own] = lesion.density.hu(sub)[own]
        labels[index][own] = i + 1
    return labels


def render_on_grid(
    grid: SampleGrid,
    *,
    head: HeadModel,
    lesions: tuple[Lesion, ...],
    pixel_spacing_mm: tuple[float, float],
    partial_volume_mm: float,
    noise_sigma_hu: float,
    noise_correlation_mm: float,
    rng: np.random.Generator,
    slab_offsets_mm: tuple[float, ...] = (0.0,),
    beam_hardening: float = 0.0,
    mass_effect: float = 0.0,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
    """HU (float32) and lesion labels (uint8) at the grid points, shape ``grid.shape`` (3-D).

    ``slab_offsets_mm``: the HU are the mean over planes moved by these offsets along the
    normal (partial volume across the slice thickness); the labels are always those of the
    voxel centres (offset 0), the truth contract. ``beam_hardening``: streak strength
    (:func:`worker.synth.ct_artifacts.beam_hardening_streaks`, per slice, before noise).
    ``mass_effect``: see :func:`mass_effect_grid`.
    """
    hu = np.zeros(grid.shape, dtype=np.float32)
    labels = np.zeros(grid.shape, dtype=np.uint8)
    for offset in slab_offsets_mm:
        plane = shifted_grid(grid, offset)
        anatomy = (
            mass_effect_grid(plane, head=head, lesions=lesions, strength=mass_effect) if mass_effect > 0 else plane
        )
        part = head.render(anatomy)
        own = _paint_lesions(plane, part, head=head, lesions=lesions)
        if offset == 0.0:
            labels = own
        hu += part
    if 0.0 not in slab_offsets_mm:  # the truth is the voxel centres' shapes
        labels = _paint_lesions(grid, np.zeros(grid.shape, dtype=np.float32), head=head, lesions=lesions)
    if len(slab_offsets_mm) > 1:
        hu *= np.float32(1.0 / len(slab_offsets_mm))
    if partial_volume_mm > 0:
        hu, _ = blur_in_plane(hu, sigma_mm=partial_volume_mm, pixel_spacing_mm=pixel_spacing_mm)
    if beam_hardening > 0:
        from worker.synth.ct_artifacts import beam_hardening_streaks

        pixel_mm = float(math.sqrt(pixel_spacing_mm[0] * pixel_spacing_mm[1]))
        for k in range(hu.shape[0]):
            hu[k] = beam_hardening_streaks(hu[k], pixel_mm=pixel_mm, strength=beam_hardening, rng=rng, n_angles=16)
    if noise_sigma_hu > 0:
        noise = rng.standard_normal(grid.shape, dtype=np.float32)
        if noise_correlation_mm > 0:
            noise, norm = blur_in_plane(noise, sigma_mm=noise_correlation_mm, pixel_spacing_mm=pixel_spacing_mm)
            noise *= np.float32(1.0 / norm)
        hu += np.float32(noise_sigma_hu) * noise
    np.clip(hu, -1024.0, 3071.0, out=hu)
    return hu, labels


def slab_offsets(spec: PhantomSpec) -> tuple[float, ...]:
    """Offsets (mm, along the normal) of the planes averaged per slice: centred, spanning the thickness."""
    n = spec.slab_samples
    if n <= 1:
        return (0.0,)
    t = spec.slice_thickness_mm
    return (
        tuple(float(t * ((k + 0.5) / n - 0.5)) for k in range(n))
        if n % 2 == 0
        else tuple(float(t * (k - (n - 1) / 2) / n) for k in range(n))
    )


def render_series(
    geometry: PhantomGeometry,
    *,
    head: HeadModel,
    lesions: tuple[Lesion, ...],
    partial_volume_mm: float,
    noise_sigma_hu: float,
    noise_correlation_mm: float,
    rng: np.random.Generator,
    chunk_slices: int = 32,
    slab_offsets_mm: tuple[float, ...] = (0.0,),
    beam_hardening: float = 0.0,
    mass_effect: float = 0.0,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
    """HU and labels of a whole series, ``(slices, rows, columns)``, rendered a few slices at a
    time so memory stays bounded for long thin series (blur and noise are in-plane only)."""
    hu = np.empty(geometry.shape, dtype=np.float32)
    labels = np.empty(geometry.shape, dtype=np.uint8)
    for k0 in range(0, geometry.n_slices, chunk_slices):
        k1 = min(k0 + chunk_slices, geometry.n_slices)
        hu[k0:k1], labels[k0:k1] = render_on_grid(
            geometry.grid(k0, k1),
            head=head,
            lesions=lesions,
            pixel_spacing_mm=geometry.pixel_spacing_mm,
            partial_volume_mm=partial_volume_mm,
            noise_sigma_hu=noise_sigma_hu,
            noise_correlation_mm=noise_correlation_mm,
            rng=rng,
            slab_offsets_mm=slab_offsets_mm,
            beam_hardening=beam_hardening,
            mass_effect=mass_effect,
        )
    return hu, labels


def mask_volume_ml(labels: npt.NDArray[np.integer], geometry: PhantomGeometry, *, label: int | None = None) -> float:
    """``sum_k count_k * row_mm * col_mm * slab_k / 1000`` for ``labels > 0`` (or ``== label``)."""
    hit = labels > 0 if label is None else labels == label
    counts = hit.reshape(hit.shape[0], -1).sum(axis=1).astype(np.float64)
    return float(np.sum(counts * np.asarray(geometry.slab_thickness_mm)) * geometry.voxel_area_mm2 / 1000.0)


def render_phantom(spec: PhantomSpec, seed: int) -> RenderedPhantom:
    """Render the phantom's axial series in memory (no DICOM): HU, labels, geometry and truth."""
    head = HeadModel.from_rng(
        stream_rng(seed, STREAM_HEAD), calcifications=spec.calcifications, skull_base=spec.skull_base
    )
    lesions = build_lesions(spec.lesions, head=head, rng=stream_rng(seed, STREAM_LESIONS))
    positions = slice_positions_mm(spec, head=head, tilt_rad=math.radians(spec.gantry_tilt_deg), seed=seed)
    geometry = build_geometry(spec, positions_mm=positions)
    hu, labels = render_series(
        geometry,
        head=head,
        lesions=lesions,
        partial_volume_mm=spec.partial_volume_mm,
        noise_sigma_hu=spec.noise_sigma_hu,
        noise_correlation_mm=spec.noise_correlation_mm,
        rng=stream_rng(seed, STREAM_NOISE),
        slab_offsets_mm=slab_offsets(spec),
        beam_hardening=spec.beam_hardening,
        mass_effect=spec.mass_effect,
    )
    records = []
    for i, lesion in enumerate(lesions):
        record = lesion.describe()
        record["mask_volume_ml"] = mask_volume_ml(labels, geometry, label=i + 1)
        records.append(record)
    return RenderedPhantom(
        hu=hu,
        labels=labels,
        geometry=geometry,
        head=head,
        lesion_shapes=lesions,
        lesions=tuple(records),
        analytic_volume_ml=float(sum(lesion.analytic_volume_ml for lesion in lesions)),
        mask_volume_ml=mask_volume_ml(labels, geometry),
    )


def render_hu(spec: PhantomSpec, seed: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8], PhantomGeometry]:
    """HU volume (float32, ``(slices, rows, columns)``, sorted along the normal), hematoma mask
    (uint8, same shape) and geometry of the phantom, in memory. See :func:`render_phantom`."""
    rendered = render_phantom(spec, seed)
    return rendered.hu, rendered.mask, rendered.geometry
