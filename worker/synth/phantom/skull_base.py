"""The lower head of the phantom: skull base, posterior fossa, face and neck (LPS mm -> HU).

Research use only, not for clinical use.

Real head CTs run from the vertex down through the skull base, often into the neck and
shoulders; that lower range is where a model trained on the upper head finds false
"blood" (muscles are 40-60 HU, dense bone casts dark streaks, the globes and the clivus
sit next to bright bone). :class:`SkullBase` adds it to :class:`worker.synth.phantom.anatomy.HeadModel`:

* the cranial floor as a height map ``floor_mm(x, y)`` (relative to the head centre):
  anterior fossa high (orbital roofs), middle fossae low (temporal lobes), the sella and
  sphenoid body in the middle, the petrous ridges rising between the middle and the
  posterior fossa, the posterior fossa lowest, the foramen magnum as an opening. The
  intracranial space is the inner table's inside *above* the floor;
* skull-base bone under the floor, ``thickness_mm`` thick (petrous pyramids much thicker
  and denser), with mastoid air cells and the sphenoid sinus;
* in the posterior fossa: the brainstem (pons), the fourth ventricle and the
  cerebellum's folia; the basal cisterns (suprasellar, ambient) and the Sylvian fissures
  as CSF;
* below the floor, inside a body outline that narrows from the face to the neck and
  widens into the shoulders: subcutaneous fat, muscle (45-60 HU) with fat planes, the
  orbits (globe ~10 HU in fat), nasal cavity, maxillary sinuses, pharynx (air), mandible
  with dense teeth, the cervical spine (vertebral bodies, spinal canal with the cord in
  CSF) and, low down, clavicles and humeral heads.

Everything is a continuous function of patient position; axes as in
:mod:`worker.synth.phantom.anatomy` (x left, y posterior, z superior; mm relative to the inner
table's centre, scaled with the head).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from worker.synth.phantom.geometry import SampleGrid

FloatA = npt.NDArray[np.floating]
AIR_HU = -1000.0
FAT_HU = -95.0

# Body outline below the skull base: (z, half width, front, back, centre y), mm at scale 1.
_OUTLINE = np.array(
    [
        (-10.0, 72.0, 95.0, 92.0, 0.0),
        (-45.0, 70.0, 98.0, 88.0, 0.0),
        (-80.0, 62.0, 92.0, 78.0, 2.0),
        (-105.0, 54.0, 72.0, 66.0, 8.0),
        (-135.0, 54.0, 52.0, 62.0, 12.0),
        (-165.0, 110.0, 60.0, 70.0, 12.0),
        (-200.0, 185.0, 75.0, 82.0, 12.0),
        (-400.0, 190.0, 80.0, 85.0, 12.0),
    ]
)


def _sig(t: FloatA, width: float) -> FloatA:
    return np.asarray(1.0 / (1.0 + np.exp(-np.clip(t / width, -40.0, 40.0))))


def _blob(dx: FloatA, dy: FloatA, dz: FloatA, axes: tuple[float, float, float]) -> FloatA:
    """Ellipsoid level ``(dx/a)^2 + (dy/b)^2 + (dz/c)^2`` (1 on the surface)."""
    return np.asarray((dx / axes[0]) ** 2 + (dy / axes[1]) ** 2 + (dz / axes[2]) ** 2)


@dataclass(frozen=True)
class SkullBase:
    """The lower head; lengths in mm at ``scale`` 1, densities in HU. Build with :meth:`from_rng`."""

    center_mm: tuple[float, float, float]
    scale: float = 1.0
    anterior_floor_mm: float = -22.0
    middle_floor_mm: float = -44.0
    posterior_floor_mm: float = -57.0
    petrous_top_mm: float = -30.0
    thickness_mm: float = 6.0
    bone_hu: float = 1500.0
    petrous_hu: float = 1900.0
    muscle_hu: float = 52.0
    mastoid_air: float = 0.5  # share of mastoid cells that are aerated
    sphenoid_air: bool = True
    teeth_hu: float = 2600.0
    metal_fillings: bool = False
    phases: tuple[float, float, float] = (0.4, 1.3, 2.2)

    @classmethod
    def from_rng(cls, rng: np.random.Generator, *, center_mm: tuple[float, float, float], scale: float) -> SkullBase:
        p = [float(v) for v in rng.uniform(0.0, 2 * math.pi, 3)]
        return cls(
            center_mm=center_mm,
            scale=scale,
            anterior_floor_mm=float(rng.uniform(-26.0, -18.0)),
            middle_floor_mm=float(rng.uniform(-48.0, -40.0)),
            posterior_floor_mm=float(rng.uniform(-62.0, -52.0)),
            petrous_top_mm=float(rng.uniform(-34.0, -26.0)),
            thickness_mm=float(rng.uniform(4.5, 8.0)),
            bone_hu=float(rng.uniform(1250.0, 1750.0)),
            petrous_hu=float(rng.uniform(1700.0, 2300.0)),
            muscle_hu=float(rng.uniform(45.0, 60.0)),
            mastoid_air=float(rng.uniform(0.2, 0.8)),
            sphenoid_air=bool(rng.random() < 0.85),
            teeth_hu=float(rng.uniform(2200.0, 3000.0)),
            metal_fillings=bool(rng.random() < 0.25),
            phases=(p[0], p[1], p[2]),
        )

    # -- coordinates -------------------------------------------------------------------

    def _local(self, grid: SampleGrid) -> tuple[FloatA, FloatA, FloatA]:
        c, s = self.center_mm, self.scale
        return (
            np.asarray((grid.x - c[0]) / s),
            np.asarray((grid.y - c[1]) / s),
            np.asarray((grid.z - c[2]) / s),
        )

    def _petrous_distance(self, x: FloatA, y: FloatA) -> FloatA:
        """In-plane distance (mm, scale 1) to the petrous ridge line on either side."""
        ax_, ay_, bx_, by_ = 14.0, -6.0, 52.0, 12.0  # medial apex -> lateral end (|x|, y)
        px, py = np.abs(x), y
        vx, vy = bx_ - ax_, by_ - ay_
        t = np.clip(((px - ax_) * vx + (py - ay_) * vy) / (vx * vx + vy * vy), 0.0, 1.0)
        return np.asarray(np.hypot(px - (ax_ + t * vx), py - (ay_ + t * vy)))

    def floor_mm(self, x: FloatA, y: FloatA) -> FloatA:
        """Height (mm, scale 1, relative to the centre) of the cranial floor at ``(x, y)``."""
        ant, mid, post = self.anterior_floor_mm, self.middle_floor_mm, self.posterior_floor_mm
        front = _sig(-(y + 28.0 - 0.004 * x * x), 5.0)  # 1 in front of the middle fossa (sphenoid ridges)
        back = _sig(y - 6.0 - 0.35 * (np.abs(x) - 14.0), 4.0)  # behind the petrous line
        floor = front * ant + (1 - front) * ((1 - back) * mid + back * post)
        # Sella and sphenoid body in the middle of the middle fossa.
        central = _sig(14.0 - np.abs(x), 3.0) * _sig(y + 26.0, 3.0) * _sig(2.0 - y, 3.0)
        floor = floor * (1 - central) + (self.anterior_floor_mm - 8.0) * central
        # Clivus: slopes from the dorsum sellae down to the foramen magnum.
        clivus = _sig(12.0 - np.abs(x), 3.0) * _sig(y - 0.0, 2.0) * _sig(18.0 - y, 2.0)
        clivus_z = self.anterior_floor_mm - 8.0 + (y / 18.0) * (post - 6.0 - (self.anterior_floor_mm - 8.0))
        floor = np.maximum(floor, np.where(clivus > 0.5, clivus_z, -1e3))
        # Petrous ridges between the middle and the posterior fossa.
        ridge = self.petrous_top_mm - 0.25 * (self._petrous_distance(x, y) ** 2) / 3.0
        floor = np.maximum(floor, ridge)
        # Foramen magnum: an opening behind the clivus.
        hole = np.hypot(x / 16.0, (y - 30.0) / 19.0) < 1.0
        return np.asarray(np.where(hole, post - 60.0, floor))

    def depth_above_floor_mm(self, grid: SampleGrid) -> FloatA:
        """A lower bound of the distance (mm) from a point down to the cranial floor (< 0 below)."""
        x, y, z = self._local(grid)
        return np.asarray((z - self.floor_mm(x, y)) * 0.75 * self.scale)

    # -- painting ----------------------------------------------------------------------

    def paint_intracranial(
        self, grid: SampleGrid, hu: npt.NDArray[np.float32], inside: npt.NDArray[np.bool_], csf_hu: float
    ) -> None:
        """Posterior-fossa and basal structures inside the intracranial space (in place).

        Only points below the level of the basal cisterns are evaluated (gathered first), so
        the cost follows the number of low intracranial voxels, not the grid.
        """
        shape = hu.shape
        x, y, z = self._local(grid)
        region = np.broadcast_to(inside, shape) & np.broadcast_to(z < self.anterior_floor_mm + 24.0, shape)
        if not region.any():
            return
        x, y, z = (np.broadcast_to(a, shape)[region] for a in (x, y, z))
        values = hu[region]
        # Cerebellar folia: fine stripes of grey/white in the posterior fossa below the tentorium.
        tent = self.petrous_top_mm + 0.18 * (y - 10.0)
        cerebellum = (y > 8.0) & (z < tent) & (z > self.posterior_floor_mm - 2)
        wobble = 1.5 * np.sin(x / 9.0 + self.phases[1]) * np.sin(y / 7.0 + self.phases[2])
        folia = np.sin((np.hypot(x, y - 10.0) + wobble) / 1.3 + z / 2.2 + self.phases[0])
        values = np.where(cerebellum, np.where(folia > 0.7, 33.0, 39.0), values)
        pons = _blob(x, y - 8.0, z - (self.petrous_top_mm - 8.0), (13.0, 11.0, 14.0)) < 1.0
        values = np.where(pons, 31.0, values)
        v4 = _blob(x, y - 20.0, z - (self.petrous_top_mm - 10.0), (5.0, 3.0, 7.0)) < 1.0
        # Basal cisterns: suprasellar (above the sella), ambient (round the midbrain), Sylvian fissures.
        supra = _blob(x, y + 10.0, z - (self.anterior_floor_mm + 2.0), (12.0, 9.0, 5.0)) < 1.0
        r_mid = np.hypot(x / 15.0, (y - 4.0) / 13.0)
        ambient = (r_mid > 0.85) & (r_mid < 1.05) & (np.abs(z - (self.anterior_floor_mm + 4.0)) < 5.0)
        sylvian = (
            (np.abs(np.abs(x) - 38.0 - 0.15 * y) < 1.6)
            & (np.abs(z - (self.anterior_floor_mm + 14.0)) < 9.0)
            & (y > -35.0)
            & (y < 10.0)
        )
        values = np.where(v4 | supra | ambient | sylvian, csf_hu, values)
        hu[region] = values.astype(np.float32)

    def paint_lower(self, grid: SampleGrid, hu: npt.NDArray[np.float32], table_depth: FloatA, skull_mm: FloatA) -> None:
        """Skull-base bone under the floor and the face/neck below it (in place).

        ``table_depth``: the inner table's depth (mm, > 0 inside); ``skull_mm``: the calvarial
        thickness at each point (to know where the cranium's outer surface lies).
        """
        x, y, z = self._local(grid)
        shape = hu.shape
        floor = self.floor_mm(x, y)
        petrous = self._petrous_distance(x, y) < 9.0
        thick = np.where(petrous, self.thickness_mm + 9.0, self.thickness_mm)
        within_cranium = table_depth > -skull_mm
        base_bone = (z <= floor) & (z > floor - thick) & within_cranium
        below = z <= floor - thick
        # Bone: dense, denser in the petrous pyramids; air cells in the mastoid and the sphenoid.
        bone_value = np.where(petrous, self.petrous_hu, self.bone_hu)
        cells = np.sin(x / 1.7 + self.phases[1]) * np.sin(y / 1.9) * np.sin(z / 1.8 + self.phases[2])
        mastoid = (np.abs(x) > 38.0) & (y > 4.0) & (y < 34.0) & (cells > 1.0 - 2.0 * self.mastoid_air)
        sphenoid = self.sphenoid_air & (np.abs(x) < 13.0) & (y > -26.0) & (y < -2.0) & (z < floor - 2.0)
        bone = np.where(mastoid | sphenoid, AIR_HU, bone_value)
        mask = np.broadcast_to(base_bone, shape)
        hu[mask] = np.broadcast_to(bone, shape)[mask]
        low = np.broadcast_to(below, shape)
        if low.any():  # evaluated only at the gathered low points
            hu[low] = self._face_and_neck(*(np.broadcast_to(a, shape)[low] for a in (x, y, z)))

    def _outline(self, z: FloatA) -> tuple[FloatA, FloatA, FloatA, FloatA]:
        zs = _OUTLINE[::-1, 0]
        cols = [np.interp(z, zs, _OUTLINE[::-1, i]) for i in range(1, 5)]
        return cols[0], cols[1], cols[2], cols[3]

    def _face_and_neck(self, x: FloatA, y: FloatA, z: FloatA) -> FloatA:
        """HU of the face, neck and shoulders (the body outline, air outside)."""
        half_w, front, back, cy = self._outline(z)
        dy = y - cy
        ay = np.where(dy < 0, front, back)
        r = np.hypot(x / half_w, dy / ay)
        edge_mm = (1.0 - r) * np.minimum(half_w, ay)
        out = np.full(np.broadcast_shapes(x.shape, y.shape, z.shape), self.muscle_hu, dtype=np.float32)
        p = self.phases
        # Fat planes between muscle groups: radial septa around the spine and one ring.
        angle = np.arctan2(dy, x)
        septa = np.sin(5.0 * angle + 0.6 * np.sin(z / 23.0 + p[0]) + p[1])
        ring = np.abs(r - 0.62 - 0.05 * np.sin(3.0 * angle + z / 17.0 + p[2])) < 0.025
        out = np.where((np.abs(septa) < 0.06) & (r > 0.3) | ring, FAT_HU, out)
        out = np.where(edge_mm < 7.0, FAT_HU, out)
        out = np.where(edge_mm < 1.5, 40.0, out)
        # Orbits: globe in fat, bony walls.
        for side in (-1.0, 1.0):
            level = _blob(x - side * 31.0, y + 60.0, z - (self.anterior_floor_mm - 12.0), (17.0, 17.0, 15.0))
            out = np.where((level < 1.25) & (level >= 1.0), 900.0, out)
            out = np.where(level < 1.0, FAT_HU + 15.0, out)
            globe = _blob(x - side * 31.0, y + 66.0, z - (self.anterior_floor_mm - 12.0), (11.5, 11.5, 11.5))
            out = np.where(globe < 1.0, 10.0, out)
            sinus = _blob(x - side * 27.0, y + 52.0, z - (self.anterior_floor_mm - 42.0), (14.0, 16.0, 15.0))
            out = np.where((sinus < 1.2) & (sinus >= 1.0), 800.0, out)
            out = np.where(sinus < 1.0, AIR_HU, out)
        # Nasal cavity with turbinates, and the pharynx.
        nasal = (np.abs(x) < 12.0) & (y < -30.0) & (y > -88.0) & (z < self.anterior_floor_mm - 6.0) & (z > -72.0)
        turbinate = np.abs(np.sin(z / 3.0 + p[0])) < 0.35
        out = np.where(nasal, np.where(turbinate & (np.abs(x) > 4.0), 30.0, AIR_HU), out)
        pharynx = _blob(x, y + 14.0, 0.0 * z, (9.0, 6.0, 1.0)) < 1.0
        out = np.where(pharynx & (z < -52.0) & (z > -160.0), AIR_HU, out)
        # Mandible (U-shaped) with teeth, from about -70 to -110 mm.
        jaw_r = np.hypot(x / 48.0, (y + 30.0) / 58.0)
        jaw = (np.abs(jaw_r - 1.0) < 0.09) & (y < -20.0) & (z < -68.0) & (z > -112.0)
        teeth = (np.abs(jaw_r - 0.98) < 0.07) & (y < -40.0) & (z < -72.0) & (z > -86.0)
        out = np.where(jaw, 1300.0, out)
        out = np.where(teeth, self.teeth_hu, out)
        if self.metal_fillings:
            out = np.where(teeth & (np.sin(x / 4.0 + p[1]) > 0.85), 3071.0, out)
        # Cervical spine: vertebral bodies (cortex and cancellous), canal with cord in CSF, arch.
        body = _blob(x, y - 14.0, 0.0 * z, (11.0, 9.0, 1.0))
        disc = np.abs(np.sin(math.pi * z / 17.0)) < 0.18
        spine = z < -58.0
        out = np.where(spine & (body < 1.0), np.where(disc, 80.0, np.where(body > 0.7, 750.0, 260.0)), out)
        canal = np.hypot(x / 8.0, (y - 32.0) / 7.0)
        out = np.where(spine & (canal < 1.45) & (canal >= 1.0), 700.0, out)
        out = np.where((z < -40.0) & (canal < 1.0), 8.0, out)
        out = np.where((z < -40.0) & (np.hypot(x / 5.0, (y - 32.0) / 4.5) < 1.0), 35.0, out)
        spinous = (np.abs(x) < 3.0) & (y > 40.0) & (y < 60.0) & spine
        out = np.where(spinous, 650.0, out)
        # Shoulders: clavicles and humeral heads.
        clavicle = (np.abs(z + 170.0) < 6.0) & (np.abs(y + 10.0) < 6.0) & (np.abs(x) > 25.0) & (np.abs(x) < 140.0)
        humerus = _blob(np.abs(x) - 160.0, y - 5.0, z + 185.0, (22.0, 22.0, 25.0)) < 1.0
        out = np.where(clavicle | humerus, 900.0, out)
        return np.asarray(np.where(r <= 1.0, out, AIR_HU))
