"""The phantom's normal head: a continuous function from patient position (LPS, mm) to HU.

Everything here is defined in patient millimetres, independent of any image grid, so a
thick tilted series, a thin series and a localizer of the same seed sample the same head.

The skeleton is the *inner table*: a piecewise ellipsoid (:class:`InnerTable`) around the
head centre whose semi-axes differ to the right/left, front/back and down/up (the octant
of each point picks its semi-axes; the surface and its normal stay continuous). The
signed *intracranial depth* ``delta(p) = (1 - rho) / |grad rho|`` (mm, first-order
distance to the inner table, positive inside) orders every layer: skull and scalp grow
outward from the inner table, CSF, cortex, sulci and white matter inward. Lesions that
hug the inner table (subdural, epidural) use the same surface, so blood can never cross
into bone.

Typical values (from a real GE head CT and textbook ranges): air -1000 HU, scalp ~40,
subcutaneous fat ~-90, cortical tables ~1400-1700, diploe ~350-600, grey matter ~40,
white matter ~29, CSF ~3-10, falx ~70, calcified choroid plexus / pineal 120-300.
With ``skull_base`` (:class:`worker.synth.phantom.skull_base.SkullBase`, the default of
:meth:`HeadModel.from_rng`) the inner table reaches deeper and a cranial floor cuts it:
anterior, middle and posterior fossae, petrous ridges, the brainstem, fourth ventricle,
cerebellar folia and basal cisterns above it; skull-base bone, the face, the neck and the
shoulders below it. Without it (``skull_base=False``) the lowest slices show a bowl of bone,
as the first version of the phantom did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from worker.synth.phantom.geometry import BoolArray, Ellipsoid, SampleGrid, Vec3
from worker.synth.phantom.skull_base import SkullBase

FloatA = npt.NDArray[np.floating]
AIR_HU = -1000.0


@dataclass(frozen=True)
class InnerTable:
    """The intracranial boundary: a piecewise ellipsoid around ``center_mm`` (LPS, mm).

    ``semi_axes_mm`` = ``(right, left, anterior, posterior, inferior, superior)``, i.e. the
    semi-axis used where ``x - cx`` is negative / positive, ``y - cy`` negative / positive
    and ``z - cz`` negative / positive.
    """

    center_mm: Vec3
    semi_axes_mm: tuple[float, float, float, float, float, float]

    def _axes(self, dx: FloatA, dy: FloatA, dz: FloatA) -> tuple[FloatA, FloatA, FloatA]:
        s = self.semi_axes_mm
        return (
            np.where(dx < 0, s[0], s[1]).astype(dx.dtype),
            np.where(dy < 0, s[2], s[3]).astype(dy.dtype),
            np.where(dz < 0, s[4], s[5]).astype(dz.dtype),
        )

    def rho_and_gradient(self, grid: SampleGrid) -> tuple[FloatA, FloatA, tuple[FloatA, FloatA, FloatA]]:
        """``rho`` (1 on the inner table), ``|grad rho|`` (1/mm) and the unit ellipsoidal direction.

        The direction ``(ex, ey, ez)`` is ``((x-cx)/ax, (y-cy)/ay, (z-cz)/az) / rho``: it says
        where on the skull a point lies (``ex = +-1`` lateral, ``ey = -1`` frontal, ``ez = 1`` vertex).
        """
        dx = grid.x - self.center_mm[0]
        dy = grid.y - self.center_mm[1]
        dz = grid.z - self.center_mm[2]
        ax, ay, az = self._axes(dx, dy, dz)
        qx, qy, qz = dx / ax, dy / ay, dz / az
        rho = np.sqrt(qx * qx + qy * qy + qz * qz)
        grad_sq = (qx / ax) ** 2 + (qy / ay) ** 2 + (qz / az) ** 2
        safe_rho = np.maximum(rho, 1e-6)
        grad = np.sqrt(grad_sq) / safe_rho
        grad = np.where(rho > 1e-6, grad, 1.0 / min(self.semi_axes_mm))
        return rho, grad, (qx / safe_rho, qy / safe_rho, qz / safe_rho)

    def depth_mm(self, grid: SampleGrid) -> FloatA:
        """Intracranial depth ``delta`` (mm): > 0 inside the skull, < 0 beyond the inner table."""
        rho, grad, _ = self.rho_and_gradient(grid)
        return np.asarray((1.0 - rho) / grad)

    def ray_constants(self, directions: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.float64], ...]:
        """For unit ``directions`` (n, 3) from the centre: ``k`` and ``g`` with ``rho = r k`` and
        ``|grad rho| = g`` along the ray (``g`` is constant along a ray), so the depth at radius
        ``r`` is ``(1 - r k) / g`` and the inner table lies at ``r = 1 / k``."""
        u = np.asarray(directions, dtype=np.float64)
        s = self.semi_axes_mm
        ax = np.where(u[:, 0] < 0, s[0], s[1])
        ay = np.where(u[:, 1] < 0, s[2], s[3])
        az = np.where(u[:, 2] < 0, s[4], s[5])
        k = np.sqrt((u[:, 0] / ax) ** 2 + (u[:, 1] / ay) ** 2 + (u[:, 2] / az) ** 2)
        g = np.sqrt((u[:, 0] / ax**2) ** 2 + (u[:, 1] / ay**2) ** 2 + (u[:, 2] / az**2) ** 2) / k
        return k, g


@dataclass(frozen=True)
class HeadModel:
    """A normal adult head. All lengths in mm (LPS), densities in HU.

    Build one with :meth:`from_rng` (mild random variation) or directly. The structures
    (ventricles, nuclei, calcifications) are positioned relative to ``inner_table.center_mm``.
    """

    inner_table: InnerTable
    skull_mm: float = 6.5  # mean thickness; 2 mm thinner laterally, 2 mm thicker front/back
    scalp_mm: float = 5.0
    csf_mm: float = 1.6  # subarachnoid space over the convexity
    cortex_mm: float = 3.0
    sulcus_depth_mm: float = 14.0
    ventricle_scale: float = 1.0
    grey_hu: float = 40.0
    white_hu: float = 29.0
    csf_hu: float = 7.0
    calcifications: bool = True
    choroid_hu: float = 220.0
    pineal_hu: float = 180.0
    fold_phases: tuple[float, float, float, float, float, float] = (0.3, 1.1, 2.0, 0.7, 2.6, 1.7)
    skull_base: SkullBase | None = None

    @classmethod
    def from_rng(cls, rng: np.random.Generator, *, calcifications: bool = True, skull_base: bool = True) -> HeadModel:
        """A head with sizes varied by a few per cent and random cortical folding.

        ``skull_base=True`` adds the skull base, posterior fossa, face and neck
        (:class:`SkullBase`, drawn after every other value, so a seed gives the same upper
        head either way) and lets the inner table reach 75 mm below the centre, where the
        cranial floor, not the ellipsoid, closes the intracranial space.
        """
        scale = float(rng.uniform(0.94, 1.05))
        base = (66.0, 66.0, 81.0, 89.0, 75.0 if skull_base else 52.0, 70.0)
        s = [a * scale * float(rng.uniform(0.97, 1.03)) for a in base]
        p = [float(v) for v in rng.uniform(0.0, 2 * math.pi, 6)]
        return cls(
            inner_table=InnerTable(center_mm=(0.0, 0.0, 0.0), semi_axes_mm=(s[0], s[1], s[2], s[3], s[4], s[5])),
            skull_mm=float(rng.uniform(5.8, 7.4)),
            scalp_mm=float(rng.uniform(4.0, 6.0)),
            csf_mm=float(rng.uniform(1.2, 2.4)),
            ventricle_scale=float(rng.uniform(0.9, 1.25)),
            grey_hu=float(rng.uniform(37.0, 42.0)),
            white_hu=float(rng.uniform(26.0, 31.0)),
            csf_hu=float(rng.uniform(3.0, 10.0)),
            calcifications=calcifications,
            choroid_hu=float(rng.uniform(130.0, 300.0)),
            pineal_hu=float(rng.uniform(110.0, 260.0)),
            fold_phases=(p[0], p[1], p[2], p[3], p[4], p[5]),
            skull_base=SkullBase.from_rng(rng, center_mm=(0.0, 0.0, 0.0), scale=scale) if skull_base else None,
        )

    # -- structures (ellipsoids relative to the head centre) -------------------------------

    def _at(self, offset: Vec3, axes: Vec3, *, scale: float = 1.0) -> Ellipsoid:
        c = self.inner_table.center_mm
        return Ellipsoid(
            center_mm=(c[0] + offset[0], c[1] + offset[1], c[2] + offset[2]),
            semi_axes_mm=(axes[0] * scale, axes[1] * scale, axes[2] * scale),
        )

    def lateral_ventricle(self, side: int) -> tuple[Ellipsoid, ...]:
        """One lateral ventricle (``side`` -1 right, +1 left) as a union of four ellipsoids:
        frontal horn, body, atrium (trigone) and occipital horn."""
        s = self.ventricle_scale
        return (
            self._at((side * 11.0, -24.0, 15.0), (5.0, 11.0, 7.5), scale=s),
            self._at((side * 10.0, 2.0, 21.0), (4.5, 24.0, 6.0), scale=s),
            self._at((side * 17.0, 28.0, 14.0), (7.0, 9.0, 8.0), scale=s),
            self._at((side * 19.0, 43.0, 9.0), (4.0, 11.0, 5.0), scale=s),
        )

    def third_ventricle(self) -> Ellipsoid:
        return self._at((0.0, 6.0, 2.0), (2.2, 12.0, 8.0), scale=self.ventricle_scale)

    def ventricles(self) -> tuple[Ellipsoid, ...]:
        return (*self.lateral_ventricle(-1), *self.lateral_ventricle(1), self.third_ventricle())

    def deep_grey(self) -> tuple[Ellipsoid, ...]:
        """Caudate heads, lentiform nuclei and thalami (grey matter), both sides."""
        out: list[Ellipsoid] = []
        for side in (-1, 1):
            out.append(self._at((side * 22.0, -3.0, 2.0), (6.5, 15.0, 10.0)))
            out.append(self._at((side * 10.0, 14.0, 6.0), (8.0, 12.0, 9.0)))
            out.append(self._at((side * 15.0, -18.0, 12.0), (4.5, 8.0, 8.0)))
        return tuple(out)

    def calcification_spheres(self) -> tuple[tuple[Ellipsoid, float], ...]:
        """Physiological calcifications with their HU: choroid plexus glomus in each atrium
        and the pineal gland. Bright, but never hemorrhage. Empty when disabled."""
        if not self.calcifications:
            return ()
        s = self.ventricle_scale
        out = [(self._at((side * 17.0 * s, 29.0 * s, 13.0 * s), (2.6, 2.6, 2.6)), self.choroid_hu) for side in (-1, 1)]
        out.append((self._at((0.0, 24.0, 5.0), (3.0, 3.0, 2.5)), self.pineal_hu))
        return tuple(out)

    # -- continuous fields ---------------------------------------------------------------

    def skull_thickness_mm(self, ex: FloatA, ey: FloatA, ez: FloatA) -> FloatA:
        """Skull thickness (mm) by position on the skull: thin temporal, thick frontal/occipital."""
        wave = 0.4 * np.sin(5.0 * ex + 3.0 * ez + self.fold_phases[0])
        return np.asarray(self.skull_mm + 2.0 * ey * ey - 2.0 * ex * ex + wave)

    def _fold_field(self, grid: SampleGrid) -> FloatA:
        """A smooth field whose near-zero sheets are the sulci (wavelength ~40 mm)."""
        p = self.fold_phases
        c = self.inner_table.center_mm
        x, y, z = grid.x - c[0], grid.y - c[1], grid.z - c[2]
        f = np.sin(x / 6.5 + p[0]) * np.sin(y / 7.0 + p[1])
        f = f + np.sin(y / 5.5 + p[2]) * np.sin(z / 6.0 + p[3])
        f = f + np.sin(z / 7.5 + p[4]) * np.sin(x / 5.0 + p[5])
        return np.asarray(f)

    def intracranial_depth_mm(self, grid: SampleGrid) -> FloatA:
        """Depth (mm, > 0 inside): to the inner table, and (with a skull base) above the floor."""
        depth = self.inner_table.depth_mm(grid)
        if self.skull_base is None:
            return depth
        return np.asarray(np.minimum(depth, self.skull_base.depth_above_floor_mm(grid)))

    def render(self, grid: SampleGrid) -> npt.NDArray[np.float32]:
        """Noise-free HU of the normal head at the grid points, float32 of ``grid.shape``."""
        g = grid.astype(np.float32)
        rho, grad, (ex, ey, ez) = self.inner_table.rho_and_gradient(g)
        table_depth = (1.0 - rho) / grad  # > 0 inside
        skull = self.skull_thickness_mm(ex, ey, ez)
        out = -table_depth  # distance outward from the inner table
        depth = table_depth
        if self.skull_base is not None:
            depth = np.minimum(table_depth, self.skull_base.depth_above_floor_mm(g))
        frac = out / skull  # 0 inner table .. 1 outer table

        hu = np.full(grid.shape, AIR_HU, dtype=np.float32)
        # Scalp: galea/periosteum, subcutaneous fat, skin.
        beyond = out - skull
        hu[(beyond >= 0) & (beyond < self.scalp_mm)] = 42.0
        hu[(beyond >= 1.2) & (beyond < self.scalp_mm - 1.6)] = -90.0
        # Skull: inner and outer tables with diploe between (thinner diploe where thin).
        in_skull = (out >= 0) & (out < skull)
        table_hu = 1450.0 + 200.0 * ez
        diploe = (frac > 0.3) & (frac < 0.7)
        hu[in_skull] = np.broadcast_to(table_hu, grid.shape)[in_skull]
        diploe_hu = 420.0 + 120.0 * np.sin(3.0 * ex + 4.0 * ey)
        d_mask = in_skull & diploe
        hu[d_mask] = np.broadcast_to(diploe_hu, grid.shape)[d_mask]

        # Brain: CSF over the convexity, cortex, sulci (CSF clefts lined by cortex), white matter.
        inside = depth > 0
        fold = np.abs(self._fold_field(g))
        below_csf = depth - self.csf_mm
        sulcal = below_csf < self.sulcus_depth_mm
        grey = (below_csf < self.cortex_mm) | ((fold < 0.55) & (below_csf < self.sulcus_depth_mm + 2.5))
        tissue = np.where(grey, np.float32(self.grey_hu), np.float32(self.white_hu))
        csf = (depth < self.csf_mm) | (sulcal & (fold < 0.12))
        tissue = np.where(csf, np.float32(self.csf_hu), tissue)
        # A faint low-frequency variation, as real parenchyma is never perfectly flat.
        c = self.inner_table.center_mm
        tissue = tissue + 1.5 * np.sin((g.x - c[0]) / 23.0) * np.sin((g.y - c[1]) / 31.0 + (g.z - c[2]) / 19.0)
        hu = np.where(inside, tissue, hu).astype(np.float32)

        self._paint_midline(g, hu, depth)
        for e in self.deep_grey():
            self._paint(g, hu, e, self.grey_hu - 2.0)
        for e in self.ventricles():
            self._paint(g, hu, e, self.csf_hu - 1.0)
        for e, value in self.calcification_spheres():
            self._paint(g, hu, e, value)
        if self.skull_base is not None:
            self.skull_base.paint_intracranial(g, hu, inside, self.csf_hu)
            self.skull_base.paint_lower(g, hu, table_depth, skull)
        return hu

    def _paint_midline(self, g: SampleGrid, hu: npt.NDArray[np.float32], depth: FloatA) -> None:
        """Interhemispheric fissure (CSF) with the falx (~70 HU) in it, above the corpus
        callosum and all the way down in front of and behind it."""
        c = self.inner_table.center_mm
        ax = np.abs(g.x - c[0])
        dy = g.y - c[1]
        dz = g.z - c[2]
        above_cc = (dz > 28.0 * self.ventricle_scale) | (np.abs(dy) > 40.0)
        fissure = (ax < 1.6) & (depth > 0) & above_cc
        falx = (ax < 0.6) & (depth > 0) & above_cc
        hu[np.broadcast_to(fissure, hu.shape)] = self.csf_hu
        hu[np.broadcast_to(falx, hu.shape)] = 70.0

    @staticmethod
    def _paint(g: SampleGrid, hu: npt.NDArray[np.float32], e: Ellipsoid, value: float) -> None:
        found = g.block(e.center_mm, e.bounding_radius_mm + 0.01)
        if found is None:
            return
        index, sub = found
        region = hu[index]
        region[e.contains(sub)] = value

    def calcification_mask(self, grid: SampleGrid) -> BoolArray:
        """True where a grid point lies in a physiological calcification."""
        mask = np.zeros(grid.shape, dtype=bool)
        for e, _ in self.calcification_spheres():
            mask |= e.contains(grid)
        return mask

    def ventricle_mask(self, grid: SampleGrid) -> BoolArray:
        mask = np.zeros(grid.shape, dtype=bool)
        for e in self.ventricles():
            mask |= e.contains(grid)
        return mask
