"""Hematomas for the phantom: continuous shapes in patient mm (LPS) with known volume.

Each lesion answers ``contains(grid)`` for any sample points (a voxel is hematoma when its
*centre* is inside), paints acute blood of 50-90 HU (``blood_hu``), and may carry a
hypodense edema rim (15-25 HU) that is never hematoma. Its ``analytic_volume_ml`` is
computed from the continuous shape, never from an image grid:

* ``round`` -- an ellipsoid: closed form ``4/3 pi a b c``;
* ``irregular`` -- a union of 3-5 ellipsoids (lobes): integrated exactly along z and by
  the midpoint rule on a 0.1 mm ``(x, y)`` lattice (error < 0.02 %, see
  :func:`worker.synth.phantom.geometry.ellipsoid_union_volume_mm3`);
* ``intraventricular`` -- blood layering in the dependent (posterior, +y) part of a
  lateral ventricle: ``union(ventricle ellipsoids) and y >= level, minus calcifications``,
  integrated the same way;
* ``subdural`` (crescent) and ``epidural`` (biconvex lens) -- a band under the inner
  table, ``0 <= depth < t(direction)``: along every ray from the head centre the band is
  one radial interval in closed form, so the volume is a 2-D quadrature over directions
  (midpoint rule, 400 x 720 nodes in polar angle and azimuth around the lesion axis;
  error < 0.001 %);
* ``blast`` -- a real hemorrhage label map (BLAST-CT, 1 mm NIfTI) read from a path and
  placed in the head: a union of voxel cubes, volume = voxel count x voxel volume (exact).

Lesions are placed inside the intracranial space (every sampled surface point at least
1 mm deep) and disjoint from each other and from calcifications, so the volume of the
union is the sum of the volumes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from worker.synth.phantom.anatomy import InnerTable
from worker.synth.phantom.geometry import (
    F64,
    BoolArray,
    Ellipsoid,
    SampleGrid,
    Vec3,
)

KINDS = ("round", "irregular", "intraventricular", "subdural", "epidural")
ALL_KINDS = (*KINDS, "blast")
BLOOD_HU_RANGE = (50.0, 90.0)
RIM_HU_RANGE = (15.0, 25.0)
MM3_PER_ML = 1000.0
INSIDE_MARGIN_MM = 1.0

_RANDOM_MEAN_HU = {
    "round": (58.0, 76.0),
    "irregular": (58.0, 76.0),
    "intraventricular": (52.0, 66.0),
    "subdural": (55.0, 72.0),
    "epidural": (60.0, 78.0),
    "blast": (58.0, 76.0),
}


@dataclass(frozen=True)
class LesionSpec:
    """What lesion to put in a phantom; ``None`` fields are drawn from the seed.

    * ``kind``: ``round``, ``irregular``, ``intraventricular``, ``subdural``, ``epidural``,
      ``blast`` (needs ``source_path``) or ``random`` (one of the first five).
    * ``volume_ml``: target volume; the shape is scaled (or, for intraventricular blood,
      the fluid level moved; for subdural/epidural the thickness) to reach it. The truth
      is the volume of the final continuous shape, within ~1 % of the target.
    * ``center_mm``: LPS mm. For parenchymal kinds the lesion centre; for subdural and
      epidural a point that gives the direction from the head centre; for
      intraventricular the side is taken from its x.
    * ``side``: ``left`` / ``right`` (``both`` for intraventricular); ignored with a centre.
    * ``edema_rim_mm``: hypodense rim width for round/irregular/blast (0: none).
    * ``mean_hu``: mean blood density, within 50-90 HU.
    """

    kind: str
    volume_ml: float | None = None
    center_mm: tuple[float, float, float] | None = None
    side: str | None = None
    edema_rim_mm: float | None = None
    mean_hu: float | None = None
    source_path: Path | None = None
    source_label: int = 1

    def __post_init__(self) -> None:
        if self.kind not in (*ALL_KINDS, "random"):
            raise ValueError(f"unknown lesion kind {self.kind!r}: use one of {', '.join((*ALL_KINDS, 'random'))}")
        if self.volume_ml is not None and not (0.05 <= self.volume_ml <= 250.0):
            raise ValueError(f"lesion volume {self.volume_ml} mL is out of range: use 0.05 to 250 mL")
        if self.side is not None and self.side not in ("left", "right", "both"):
            raise ValueError(f"lesion side {self.side!r}: use left, right or both")
        if self.mean_hu is not None and not (BLOOD_HU_RANGE[0] <= self.mean_hu <= BLOOD_HU_RANGE[1]):
            raise ValueError(f"mean blood density {self.mean_hu} HU: acute blood is 50 to 90 HU")
        if self.edema_rim_mm is not None and not (0.0 <= self.edema_rim_mm <= 15.0):
            raise ValueError(f"edema rim {self.edema_rim_mm} mm: use 0 to 15 mm")
        if self.kind == "blast" and self.source_path is None:
            raise ValueError("a 'blast' lesion needs source_path: a BLAST-CT label map (.nii.gz)")


@dataclass(frozen=True)
class BloodDensity:
    """Acute blood: ``mean_hu`` with a smooth heterogeneity, clipped to 50-90 HU."""

    mean_hu: float
    heterogeneity_hu: float
    phases: tuple[float, float, float]

    def hu(self, grid: SampleGrid) -> npt.NDArray[np.float32]:
        p = self.phases
        wave = np.sin(grid.x / 4.0 + p[0]) * np.sin(grid.y / 5.0 + p[1]) * np.sin(grid.z / 4.5 + p[2])
        value = self.mean_hu + self.heterogeneity_hu * wave
        return np.broadcast_to(np.clip(value, *BLOOD_HU_RANGE), grid.shape).astype(np.float32)

    @classmethod
    def from_rng(cls, rng: np.random.Generator, *, kind: str, mean_hu: float | None) -> BloodDensity:
        lo, hi = _RANDOM_MEAN_HU[kind]
        mean = float(rng.uniform(lo, hi)) if mean_hu is None else float(mean_hu)
        p = [float(v) for v in rng.uniform(0.0, 2 * math.pi, 3)]
        return cls(mean_hu=mean, heterogeneity_hu=float(rng.uniform(2.0, 6.0)), phases=(p[0], p[1], p[2]))


class Lesion(Protocol):
    """A hematoma: a continuous shape in patient mm (LPS)."""

    @property
    def kind(self) -> str: ...

    @property
    def center_mm(self) -> Vec3: ...

    @property
    def bounding_radius_mm(self) -> float: ...

    @property
    def analytic_volume_ml(self) -> float: ...

    @property
    def density(self) -> BloodDensity: ...

    @property
    def rim_hu(self) -> float: ...

    @property
    def rim_mm(self) -> float: ...

    def contains(self, grid: SampleGrid) -> BoolArray: ...

    def rim_contains(self, grid: SampleGrid) -> BoolArray | None: ...

    def surface_points(self) -> F64: ...

    def describe(self) -> dict[str, Any]: ...


def _ellipsoid_dict(e: Ellipsoid) -> dict[str, Any]:
    return {
        "center_mm": list(e.center_mm),
        "semi_axes_mm": list(e.semi_axes_mm),
        "rotation": [list(r) for r in e.rotation],
    }


def _union_contains(ellipsoids: tuple[Ellipsoid, ...], grid: SampleGrid) -> BoolArray:
    mask = np.zeros(grid.shape, dtype=bool)
    for e in ellipsoids:
        mask |= e.contains(grid)
    return mask


@dataclass(frozen=True)
class LobulatedLesion:
    """``round`` (one ellipsoid) or ``irregular`` (a union of lobes) intraparenchymal hematoma."""

    kind: str
    lobes: tuple[Ellipsoid, ...]
    density: BloodDensity
    analytic_volume_ml: float
    volume_method: str
    rim_mm: float = 0.0
    rim_hu: float = 20.0
    target_volume_ml: float | None = None

    @property
    def center_mm(self) -> Vec3:
        return self.lobes[0].center_mm

    @property
    def bounding_radius_mm(self) -> float:
        c = np.asarray(self.center_mm)
        return max(float(np.linalg.norm(np.asarray(e.center_mm) - c)) + e.bounding_radius_mm for e in self.lobes)

    def translated(self, offset_mm: npt.ArrayLike) -> LobulatedLesion:
        o = np.asarray(offset_mm, dtype=np.float64)
        return replace(self, lobes=tuple(e.translated((float(o[0]), float(o[1]), float(o[2]))) for e in self.lobes))

    def contains(self, grid: SampleGrid) -> BoolArray:
        return _union_contains(self.lobes, grid)

    def rim_contains(self, grid: SampleGrid) -> BoolArray | None:
        if self.rim_mm <= 0:
            return None
        return _union_contains(tuple(e.dilated(self.rim_mm) for e in self.lobes), grid)

    def surface_points(self) -> F64:
        return np.concatenate([e.surface_points() for e in self.lobes])

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "center_mm": list(self.center_mm),
            "analytic_volume_ml": self.analytic_volume_ml,
            "volume_method": self.volume_method,
            "target_volume_ml": self.target_volume_ml,
            "mean_hu": self.density.mean_hu,
            "edema_rim_mm": self.rim_mm,
            "edema_rim_hu": self.rim_hu if self.rim_mm > 0 else None,
            "ellipsoids": [_ellipsoid_dict(e) for e in self.lobes],
        }


@dataclass(frozen=True)
class VentricularLesion:
    """Intraventricular blood layering posteriorly (supine patient): ventricle and ``y >= level``."""

    ventricle: tuple[Ellipsoid, ...]
    level_y_mm: float
    excluded: tuple[Ellipsoid, ...]  # calcifications inside the ventricle stay out
    side: str
    density: BloodDensity
    analytic_volume_ml: float
    volume_method: str
    target_volume_ml: float | None = None
    kind: str = "intraventricular"
    rim_hu: float = 20.0
    rim_mm: float = 0.0  # no edema rim

    @property
    def center_mm(self) -> Vec3:
        pts = self.surface_points()
        pts = pts[pts[:, 1] >= self.level_y_mm]
        c = pts.mean(axis=0) if len(pts) else np.asarray(self.ventricle[0].center_mm)
        return (float(c[0]), float(c[1]), float(c[2]))

    @property
    def bounding_radius_mm(self) -> float:
        c = np.asarray(self.center_mm)
        return max(float(np.linalg.norm(np.asarray(e.center_mm) - c)) + e.bounding_radius_mm for e in self.ventricle)

    def contains(self, grid: SampleGrid) -> BoolArray:
        mask = _union_contains(self.ventricle, grid)
        mask &= np.broadcast_to(grid.y >= self.level_y_mm, grid.shape)
        for e in self.excluded:
            mask &= ~e.contains(grid)
        return mask

    def rim_contains(self, grid: SampleGrid) -> BoolArray | None:
        return None

    def surface_points(self) -> F64:
        return np.concatenate([e.surface_points() for e in self.ventricle])

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "center_mm": list(self.center_mm),
            "analytic_volume_ml": self.analytic_volume_ml,
            "volume_method": self.volume_method,
            "target_volume_ml": self.target_volume_ml,
            "mean_hu": self.density.mean_hu,
            "side": self.side,
            "level_y_mm": self.level_y_mm,
            "ventricle_ellipsoids": [_ellipsoid_dict(e) for e in self.ventricle],
            "excluded_ellipsoids": [_ellipsoid_dict(e) for e in self.excluded],
        }


@dataclass(frozen=True)
class ExtraAxialLesion:
    """``subdural`` (crescent) or ``epidural`` (lens): ``0 <= depth < t(direction)`` under the inner table.

    Directions ``u`` from the head centre are described by two angles around ``axis``:
    ``alpha`` towards ``tangent_1`` (horizontal) and ``beta`` towards ``tangent_2``; with
    ``s = sqrt((alpha/extent_1)^2 + (beta/extent_2)^2)`` the thickness is
    ``max_thickness * cos^2(pi s / 2)`` (subdural) or ``max_thickness * (1 - s^2)`` (epidural)
    for ``s < 1``, else 0. ``depth`` is :meth:`InnerTable.depth_mm`.
    """

    kind: str
    table: InnerTable
    axis: Vec3
    tangent_1: Vec3
    tangent_2: Vec3
    extent_rad: tuple[float, float]
    max_thickness_mm: float
    density: BloodDensity
    analytic_volume_ml: float
    volume_method: str
    target_volume_ml: float | None = None
    rim_hu: float = 20.0
    rim_mm: float = 0.0  # no edema rim
    _sphere: tuple[Vec3, float] = field(default=((0.0, 0.0, 0.0), 0.0), repr=False)

    @property
    def center_mm(self) -> Vec3:
        return self._sphere[0]

    @property
    def bounding_radius_mm(self) -> float:
        return self._sphere[1]

    @property
    def cone_half_angle_rad(self) -> float:
        return max(self.extent_rad)

    def thickness_mm(self, s: npt.NDArray[np.floating]) -> npt.NDArray[np.floating]:
        """Thickness (mm) at cap coordinate ``s`` (0 on the axis, 1 at the edge of the cap)."""
        c = np.minimum(s, 1.0)
        profile = np.cos(0.5 * np.pi * c) ** 2 if self.kind == "subdural" else 1.0 - c**2
        return np.where(s < 1.0, profile * self.max_thickness_mm, 0.0)

    def cap_coordinate(self, d: tuple[Any, Any, Any]) -> npt.NDArray[np.floating]:
        a, t1, t2 = self.axis, self.tangent_1, self.tangent_2
        along = d[0] * a[0] + d[1] * a[1] + d[2] * a[2]
        alpha = np.arctan2(d[0] * t1[0] + d[1] * t1[1] + d[2] * t1[2], along)
        beta = np.arctan2(d[0] * t2[0] + d[1] * t2[1] + d[2] * t2[2], along)
        s = np.sqrt((alpha / self.extent_rad[0]) ** 2 + (beta / self.extent_rad[1]) ** 2)
        return np.where(along > 0, s, np.inf)

    def contains(self, grid: SampleGrid) -> BoolArray:
        c = self.table.center_mm
        d = (grid.x - c[0], grid.y - c[1], grid.z - c[2])
        depth = self.table.depth_mm(grid)
        t = self.thickness_mm(self.cap_coordinate(d))
        return np.broadcast_to((depth >= 0) & (depth < t), grid.shape)

    def rim_contains(self, grid: SampleGrid) -> BoolArray | None:
        return None

    def quadrature_directions(self, n_polar: int, n_azimuth: int) -> tuple[F64, F64]:
        """Midpoint quadrature nodes over the cap: unit directions (n, 3) and solid-angle weights."""
        psi_max = self.cone_half_angle_rad
        dpsi = psi_max / n_polar
        dphi = 2 * math.pi / n_azimuth
        psi = (np.arange(n_polar) + 0.5) * dpsi
        phi = (np.arange(n_azimuth) + 0.5) * dphi
        pp, ff = np.meshgrid(psi, phi, indexing="ij")
        a, t1, t2 = (np.asarray(v) for v in (self.axis, self.tangent_1, self.tangent_2))
        sp = np.sin(pp).ravel()
        u = (
            np.cos(pp).ravel()[:, None] * a[None, :]
            + (sp * np.cos(ff).ravel())[:, None] * t1[None, :]
            + (sp * np.sin(ff).ravel())[:, None] * t2[None, :]
        )
        return u, sp * dpsi * dphi

    def volume_mm3(self, *, n_polar: int = 400, n_azimuth: int = 720) -> float:
        """Volume of the band: sum over directions of ``(r_out^3 - r_in^3) / 3`` times solid angle."""
        u, w = self.quadrature_directions(n_polar, n_azimuth)
        return float(band_volume(self.table, u, w, self.thickness_mm(self.cap_coordinate((u[:, 0], u[:, 1], u[:, 2])))))

    def surface_points(self) -> F64:
        u, _ = self.quadrature_directions(40, 72)
        t = self.thickness_mm(self.cap_coordinate((u[:, 0], u[:, 1], u[:, 2])))
        k, g = self.table.ray_constants(u)
        c = np.asarray(self.table.center_mm)
        outer = c + u / k[:, None]
        inner = c + u * (np.maximum(1.0 - g * t, 0.0) / k)[:, None]
        keep = t > 0
        return np.concatenate([outer[keep], inner[keep]])

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "center_mm": list(self.center_mm),
            "analytic_volume_ml": self.analytic_volume_ml,
            "volume_method": self.volume_method,
            "target_volume_ml": self.target_volume_ml,
            "mean_hu": self.density.mean_hu,
            "axis": list(self.axis),
            "extent_deg": [math.degrees(e) for e in self.extent_rad],
            "max_thickness_mm": self.max_thickness_mm,
            "side": "left" if self.axis[0] > 0 else "right",
        }


def band_volume(table: InnerTable, u: F64, weights: F64, thickness: npt.NDArray[np.floating]) -> float:
    """Volume (mm^3) of ``0 <= depth < thickness`` over directions ``u`` (n, 3) with solid-angle
    ``weights``: along each ray the band is ``(1 - g t) / k < r <= 1 / k`` (closed form)."""
    k, g = table.ray_constants(u)
    return RayBand(k=k, g=g, weights=weights).volume_mm3(thickness)


@dataclass(frozen=True)
class RayBand:
    """Precomputed ray constants for repeated band volumes (solving for a thickness)."""

    k: F64
    g: F64
    weights: F64

    def volume_mm3(self, thickness: npt.NDArray[np.floating]) -> float:
        r_out = 1.0 / self.k
        r_in = np.maximum(1.0 - self.g * thickness, 0.0) / self.k
        return float(np.sum((r_out**3 - r_in**3) / 3.0 * self.weights))
