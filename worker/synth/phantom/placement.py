"""Building and placing the phantom's lesions: sizes, positions, and the rules that keep them valid.

Every lesion is placed inside the intracranial space (each sampled surface point at least
1 mm deep under the inner table), clear of physiological calcifications, and disjoint from
the lesions placed before it, so the truth volume of the union is the sum of the lesion
volumes. Random choices come from the generator passed in, so a seed fixes them all; they
do not depend on any image grid.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import numpy.typing as npt

from worker.synth.phantom.anatomy import HeadModel
from worker.synth.phantom.blast import LabelMapLesion, label_map_lesion
from worker.synth.phantom.geometry import (
    F64,
    Ellipsoid,
    Mat3,
    SampleGrid,
    Vec3,
    ellipsoid_union_row_volumes,
    ellipsoid_union_volume_mm3,
    rotation_from_angles,
)
from worker.synth.phantom.lesions import (
    INSIDE_MARGIN_MM,
    KINDS,
    MM3_PER_ML,
    RIM_HU_RANGE,
    BloodDensity,
    ExtraAxialLesion,
    Lesion,
    LesionSpec,
    LobulatedLesion,
    RayBand,
    VentricularLesion,
)

# Random volumes (mL) per kind, drawn log-uniformly when LesionSpec.volume_ml is None.
RANDOM_VOLUME_ML = {
    "round": (3.0, 50.0),
    "irregular": (8.0, 70.0),
    "subdural": (10.0, 60.0),
    "epidural": (10.0, 45.0),
}


def _random_rotation(rng: np.random.Generator) -> Mat3:
    yaw, pitch, roll = (
        rng.uniform(0.0, 2 * math.pi),
        rng.uniform(-0.5 * math.pi, 0.5 * math.pi),
        rng.uniform(0, math.pi),
    )
    return rotation_from_angles(float(yaw), float(pitch), float(roll))


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _lobulated_template(kind: str, rng: np.random.Generator) -> tuple[Ellipsoid, ...]:
    """Lobes around the origin with the main lobe's largest semi-axis 1 (arbitrary units)."""
    main = Ellipsoid(
        (0.0, 0.0, 0.0),
        (1.0, float(rng.uniform(0.75, 1.0)), float(rng.uniform(0.6, 0.9))),
        _random_rotation(rng),
    )
    if kind == "round":
        return (main,)
    lobes = [main]
    for _ in range(int(rng.integers(2, 5))):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        offset = direction * float(rng.uniform(0.55, 0.85))
        a = rng.uniform(0.35, 0.6, 3)
        axes = (float(a[0]), float(a[1]), float(a[2]))
        lobes.append(Ellipsoid((float(offset[0]), float(offset[1]), float(offset[2])), axes, _random_rotation(rng)))
    return tuple(lobes)


def _lobulated(
    kind: str, template: tuple[Ellipsoid, ...], *, volume_ml: float, center: F64, **kw: Any
) -> LobulatedLesion:
    if kind == "round":
        e = template[0]
        factor = (volume_ml * MM3_PER_ML / e.volume_mm3) ** (1.0 / 3.0)
        lobe = Ellipsoid(
            (float(center[0]), float(center[1]), float(center[2])),
            (e.semi_axes_mm[0] * factor, e.semi_axes_mm[1] * factor, e.semi_axes_mm[2] * factor),
            e.rotation,
        )
        return LobulatedLesion(
            kind=kind,
            lobes=(lobe,),
            analytic_volume_ml=lobe.volume_mm3 / MM3_PER_ML,
            volume_method="closed form 4/3*pi*a*b*c",
            target_volume_ml=volume_ml,
            **kw,
        )
    # Scaling a union scales its volume by factor^3 exactly; the template's volume (lattice
    # 1/100 of its size) sets the factor, and finalize_volume() integrates the placed shape.
    v1 = ellipsoid_union_volume_mm3(template, step_mm=0.01)
    factor = (volume_ml * MM3_PER_ML / v1) ** (1.0 / 3.0)
    lobes = tuple(e.scaled(factor).translated(_v3(center)) for e in template)
    return LobulatedLesion(
        kind=kind,
        lobes=lobes,
        analytic_volume_ml=v1 * factor**3 / MM3_PER_ML,
        volume_method="union of ellipsoids: exact along z, midpoint rule on a 0.1 mm x/y lattice (error < 0.02 %)",
        target_volume_ml=volume_ml,
        **kw,
    )


def _ventricular(
    head: HeadModel, *, side: str, volume_ml: float | None, fraction: float, density: BloodDensity
) -> VentricularLesion:
    """Blood filling the back of the ventricle(s) up to ``volume_ml`` (or ``fraction`` of them)."""
    sides = {"right": (-1,), "left": (1,), "both": (-1, 1)}[side]
    ventricle = tuple(e for s in sides for e in head.lateral_ventricle(s))
    excluded = tuple(e for e, _ in head.calcification_spheres())
    ys, rows = ellipsoid_union_row_volumes(ventricle, step_mm=0.2, excluded=excluded)
    full = float(rows.sum()) / MM3_PER_ML
    target = fraction * full if volume_ml is None else volume_ml
    if target > 0.98 * full:
        raise ValueError(
            f"intraventricular blood of {target:.1f} mL does not fit: the {side} lateral ventricle(s) hold "
            f"{full:.1f} mL; ask for less or use side='both'"
        )
    # Volume behind a level (+y is posterior, dependent when supine): cumulative from the back,
    # interpolated within the 0.2 mm row where it reaches the target.
    behind = np.cumsum(rows[::-1])[::-1]  # behind[j]: volume of rows j.. (y >= ys[j] - 0.1)
    target_mm3 = target * MM3_PER_ML
    j = int(np.searchsorted(-behind, -target_mm3, side="left"))  # first row with behind[j] <= target
    j = min(max(j, 1), len(ys) - 1)
    # Between the edges ys[j-1] - 0.1 (volume behind[j-1]) and ys[j] - 0.1 (behind[j]).
    frac = (behind[j - 1] - target_mm3) / max(rows[j - 1], 1e-12)
    level = float(ys[j - 1] - 0.1 + np.clip(frac, 0.0, 1.0) * 0.2)
    volume = ellipsoid_union_volume_mm3(ventricle, step_mm=0.1, y_min_mm=level, excluded=excluded)
    return VentricularLesion(
        ventricle=ventricle,
        level_y_mm=level,
        excluded=excluded,
        side=side,
        density=density,
        analytic_volume_ml=volume / MM3_PER_ML,
        volume_method="ventricle ellipsoids cut at the fluid level: exact along z, midpoint rule on a "
        "0.1 mm x/y lattice starting at the level (error < 0.05 %)",
        target_volume_ml=volume_ml,
    )


def _tangents(axis: F64) -> tuple[F64, F64]:
    up = np.array([0.0, 0.0, 1.0])
    t1 = np.cross(up, axis)
    t1 /= np.linalg.norm(t1)
    t2 = np.cross(axis, t1)
    return t1, t2


def _extra_axial(
    kind: str,
    head: HeadModel,
    *,
    axis: F64,
    extent_rad: tuple[float, float],
    max_extent_rad: float,
    volume_ml: float,
    density: BloodDensity,
) -> ExtraAxialLesion:
    t1, t2 = _tangents(axis)
    limit = 25.0 if kind == "subdural" else 40.0
    extent = extent_rad
    while True:  # widen the cap (up to max_extent_rad) until the volume fits under the thickness limit
        proto = ExtraAxialLesion(
            kind=kind,
            table=head.inner_table,
            axis=_v3(axis),
            tangent_1=_v3(t1),
            tangent_2=_v3(t2),
            extent_rad=extent,
            max_thickness_mm=1.0,
            density=density,
            analytic_volume_ml=0.0,
            volume_method="",
        )
        u, w = proto.quadrature_directions(300, 480)
        # Thickness per mm of max_thickness along each quadrature direction.
        unit_t = proto.thickness_mm(proto.cap_coordinate((u[:, 0], u[:, 1], u[:, 2])))
        k, g = head.inner_table.ray_constants(u)
        band = RayBand(k=k, g=g, weights=w)
        if band.volume_mm3(unit_t * limit) / MM3_PER_ML >= volume_ml:
            break
        if max(extent) >= max_extent_rad - 1e-9:
            raise ValueError(
                f"a {kind} hematoma of {volume_ml:.1f} mL does not fit under the inner table here "
                f"(at most {limit:.0f} mm thick): ask for less"
            )
        extent = (min(extent[0] * 1.15, max_extent_rad), min(extent[1] * 1.15, max_extent_rad))
    lo, hi = 0.0, limit
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if band.volume_mm3(unit_t * mid) / MM3_PER_ML < volume_ml else (lo, mid)
    thickness = 0.5 * (lo + hi)
    lesion = replace(proto, max_thickness_mm=thickness)
    pts = lesion.surface_points()
    center = 0.5 * (pts.min(axis=0) + pts.max(axis=0))
    radius = float(np.linalg.norm(pts - center, axis=1).max()) + 2.0
    return replace(
        lesion,
        analytic_volume_ml=band.volume_mm3(unit_t * thickness) / MM3_PER_ML,
        target_volume_ml=volume_ml,
        _sphere=(_v3(center), radius),
    )


def _v3(a: npt.ArrayLike) -> Vec3:
    v = np.asarray(a, dtype=np.float64)
    return (float(v[0]), float(v[1]), float(v[2]))


def _sides(side: str | None, rng: np.random.Generator, *, allow_both: bool = False) -> str:
    if side is not None:
        return side
    options = ("left", "right", "both") if allow_both else ("left", "right")
    return str(options[int(rng.integers(0, len(options)))])


def _inside_ok(head: HeadModel, points: F64, margin_mm: float = INSIDE_MARGIN_MM) -> bool:
    depth = head.intracranial_depth_mm(SampleGrid.from_points(points))
    return bool(np.all(depth >= margin_mm))


def _min_depth(head: HeadModel, lesion: Lesion) -> float:
    return float(np.min(head.intracranial_depth_mm(SampleGrid.from_points(lesion.surface_points()))))


def _angle(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    va, vb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    cos = float(va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb)))
    return math.acos(max(-1.0, min(1.0, cos)))


def lesions_disjoint(head: HeadModel, a: Lesion, b: Lesion, *, step_mm: float = 0.5) -> bool:
    """True when two lesions cannot share a point.

    Quick sufficient tests first (bounding spheres apart; angular cones from the head centre
    apart; the other lesion deeper than an extra-axial band). When they cannot decide, a
    lattice of ``step_mm`` (coarser for boxes over 8 million points) over the overlap of the
    bounding boxes: the points inside the lesion with the smaller bounding sphere, then
    whether any of them is inside the other. An overlap thinner than the lattice step could
    go unseen.
    """
    ca, cb = np.asarray(a.center_mm), np.asarray(b.center_mm)
    if float(np.linalg.norm(ca - cb)) > a.bounding_radius_mm + b.bounding_radius_mm:
        return True
    h = np.asarray(head.inner_table.center_mm)
    for e, other in ((a, b), (b, a)):
        if isinstance(e, ExtraAxialLesion):
            if not isinstance(other, ExtraAxialLesion) and _across_midline(head, e.axis[0], other):
                return True
            oc = np.asarray(other.center_mm) - h
            if isinstance(other, ExtraAxialLesion):
                if _angle(e.axis, other.axis) > e.cone_half_angle_rad + other.cone_half_angle_rad:
                    return True
            else:
                dist = float(np.linalg.norm(oc))
                if dist > other.bounding_radius_mm:
                    cone = math.asin(other.bounding_radius_mm / dist)
                    if _angle(e.axis, oc) > e.cone_half_angle_rad + cone:
                        return True
                if _min_depth(head, other) > e.max_thickness_mm + 1.0:
                    return True
    lo = np.maximum(ca - a.bounding_radius_mm, cb - b.bounding_radius_mm)
    hi = np.minimum(ca + a.bounding_radius_mm, cb + b.bounding_radius_mm)
    if np.any(hi <= lo):
        return True
    step = max(step_mm, float(np.prod(hi - lo) / 8e6) ** (1.0 / 3.0))
    axes = [np.arange(lo[i], hi[i] + step, step) for i in range(3)]
    grid = SampleGrid(
        x=axes[0][:, None, None],
        y=axes[1][None, :, None],
        z=axes[2][None, None, :],
        shape=(len(axes[0]), len(axes[1]), len(axes[2])),
    )
    small, large = (a, b) if a.bounding_radius_mm <= b.bounding_radius_mm else (b, a)
    inside = np.nonzero(small.contains(grid))
    if not inside[0].size:
        return True
    points = np.stack([axes[0][inside[0]], axes[1][inside[1]], axes[2][inside[2]]], axis=1)
    return not bool(np.any(large.contains(SampleGrid.from_points(points))))


def _clear_of_calcifications(head: HeadModel, lesion: Lesion) -> bool:
    """No point of a calcification (checked on a 0.2 mm lattice) lies in the lesion."""
    c = np.asarray(lesion.center_mm)
    for e, _ in head.calcification_spheres():
        r = e.bounding_radius_mm
        if float(np.linalg.norm(np.asarray(e.center_mm) - c)) > lesion.bounding_radius_mm + r:
            continue
        axis = np.arange(-r, r + 0.1, 0.2)
        pts = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3) + np.asarray(e.center_mm)
        pts = pts[e.contains(SampleGrid.from_points(pts))]
        if np.any(lesion.contains(SampleGrid.from_points(pts))):
            return False
    return True


def finalize_volume(lesion: Lesion) -> Lesion:
    """The lesion with its truth volume integrated from the placed shape (0.1 mm lattice for unions)."""
    if isinstance(lesion, LobulatedLesion) and len(lesion.lobes) > 1:
        return replace(lesion, analytic_volume_ml=ellipsoid_union_volume_mm3(lesion.lobes, step_mm=0.1) / MM3_PER_ML)
    if isinstance(lesion, ExtraAxialLesion):
        return replace(
            lesion,
            analytic_volume_ml=lesion.volume_mm3() / MM3_PER_ML,
            volume_method="band under the inner table: exact along rays from the head centre, midpoint "
            "quadrature over 400 x 720 directions around the axis (error < 0.001 %)",
        )
    return lesion


def build_lesion(
    spec: LesionSpec, *, head: HeadModel, rng: np.random.Generator, placed: tuple[Lesion, ...] = ()
) -> Lesion:
    """Build one lesion from its spec inside ``head``, clear of ``placed`` lesions.

    Raises ``ValueError`` with one clear line when the spec cannot be satisfied (outside the
    intracranial space, overlapping another lesion, too large for its kind).
    """
    if spec.kind == "random":
        # One of the five kinds; if it finds no room next to the lesions already placed, another.
        errors = []
        for choice in rng.permutation(len(KINDS)):
            try:
                return build_lesion(replace(spec, kind=KINDS[int(choice)]), head=head, rng=rng, placed=placed)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0])
    kind = spec.kind
    density = BloodDensity.from_rng(rng, kind=kind, mean_hu=spec.mean_hu)
    rim_hu = float(rng.uniform(*RIM_HU_RANGE))
    if spec.edema_rim_mm is not None:
        rim_mm = spec.edema_rim_mm
    else:
        rim_mm = float(rng.uniform(1.5, 4.0)) if rng.uniform() < 0.7 else 0.0
    fixed = spec.center_mm is not None
    h = np.asarray(head.inner_table.center_mm)
    tries: Iterator[tuple[Lesion | None, str]]
    if kind in ("round", "irregular", "blast"):
        tries = _parenchymal_tries(kind, spec, head=head, rng=rng, density=density, rim_mm=rim_mm, rim_hu=rim_hu)
    elif kind == "intraventricular":
        if spec.center_mm is not None:
            sides = ["left" if spec.center_mm[0] > h[0] else "right"]
        elif spec.side is not None:
            sides = [spec.side]
        else:
            sides = [str(s) for s in rng.permutation(["left", "right", "both"])]
        fraction = float(rng.uniform(0.15, 0.6))
        tries = (
            (_ventricular(head, side=s, volume_ml=spec.volume_ml, fraction=fraction, density=density), "")
            for s in sides
        )
    else:
        tries = _extra_axial_tries(kind, spec, head=head, rng=rng, density=density, placed=placed)
    last_reason = ""
    for lesion, reason in tries:
        if lesion is None:
            last_reason = reason
            continue
        # Extra-axial blood lies on the inner table by construction (depth >= 0); the rest
        # must stay at least 1 mm inside.
        margin = -1e-6 if isinstance(lesion, ExtraAxialLesion) else INSIDE_MARGIN_MM
        if not _inside_ok(head, lesion.surface_points(), margin):
            last_reason = "it reaches outside the intracranial space (or within 1 mm of the inner table)"
            continue
        if not _clear_of_calcifications(head, lesion):
            last_reason = "it overlaps a physiological calcification"
            continue
        step = 0.5 if fixed else 1.0
        if not all(lesions_disjoint(head, lesion, other, step_mm=step) for other in placed):
            last_reason = "it overlaps another lesion"
            continue
        return finalize_volume(lesion)
    where = f" at {spec.center_mm}" if fixed else ""
    raise ValueError(f"cannot place a {kind} lesion{where}: {last_reason}")


def _parenchymal_tries(
    kind: str,
    spec: LesionSpec,
    *,
    head: HeadModel,
    rng: np.random.Generator,
    density: BloodDensity,
    rim_mm: float,
    rim_hu: float,
) -> Iterator[tuple[Lesion | None, str]]:
    """The shape is drawn once; only its position is tried (up to 300 times, once if given)."""
    base: LobulatedLesion | LabelMapLesion
    if kind == "blast":
        base = label_map_lesion(spec, center=np.zeros(3), volume_ml=spec.volume_ml, density=density)
    else:
        template = _lobulated_template(kind, rng)
        volume = spec.volume_ml if spec.volume_ml is not None else _log_uniform(rng, *RANDOM_VOLUME_ML[kind])
        base = _lobulated(
            kind, template, volume_ml=volume, center=np.zeros(3), density=density, rim_mm=rim_mm, rim_hu=rim_hu
        )
    if spec.center_mm is not None:
        yield base.translated(np.asarray(spec.center_mm, dtype=np.float64)), ""
        return
    h = np.asarray(head.inner_table.center_mm)
    for attempt in range(300):
        if attempt in (100, 200) and kind != "blast":
            # No room for this shape: turn it (new template); a drawn volume is also made smaller.
            template = _lobulated_template(kind, rng)
            if spec.volume_ml is None:
                volume *= 0.7
            base = _lobulated(
                kind, template, volume_ml=volume, center=np.zeros(3), density=density, rim_mm=rim_mm, rim_hu=rim_hu
            )
        # Keep the whole shape on one side of the midline (2 mm clear of it).
        x = base.surface_points()[:, 0] - base.center_mm[0]
        side = -1.0 if _sides(spec.side, rng) == "right" else 1.0
        near = 2.0 + float(np.max(-side * x))
        offset = [side * rng.uniform(near, max(near, 60.0)), rng.uniform(-55.0, 55.0), rng.uniform(-20.0, 45.0)]
        lesion = base.translated(h + np.asarray(offset))
        if _touches_ventricles(head, lesion):
            yield None, "it overlaps a ventricle"
        else:
            yield lesion, ""


def _extra_axial_tries(
    kind: str,
    spec: LesionSpec,
    *,
    head: HeadModel,
    rng: np.random.Generator,
    density: BloodDensity,
    placed: tuple[Lesion, ...],
) -> Iterator[tuple[Lesion | None, str]]:
    """Subdural or epidural tries: a direction (given, or drawn up to 80 times), then the thickness."""
    h = np.asarray(head.inner_table.center_mm)
    volume = spec.volume_ml if spec.volume_ml is not None else _log_uniform(rng, *RANDOM_VOLUME_ML[kind])
    if kind == "subdural":
        extent = (math.radians(float(rng.uniform(35.0, 50.0))), math.radians(float(rng.uniform(25.0, 40.0))))
    else:
        extent = (math.radians(float(rng.uniform(22.0, 32.0))),) * 2
    for _ in range(1 if spec.center_mm is not None else 80):
        if spec.center_mm is not None:
            axis = np.asarray(spec.center_mm, dtype=np.float64) - h
            if float(np.linalg.norm(axis)) < 1e-6:
                yield None, "its centre is the head centre, which gives no direction"
                return
            axis /= np.linalg.norm(axis)
        else:
            side = -1.0 if _sides(spec.side, rng) == "right" else 1.0
            azimuth = math.radians(float(rng.uniform(-15.0, 15.0)))
            # With a skull base the cap must stay above the cranial floor: convexity collections.
            low_elevation = 10.0 if head.skull_base is not None else 0.0
            elevation = math.radians(float(rng.uniform(low_elevation, low_elevation + 25.0)))
            axis = np.array(
                [
                    side * math.cos(azimuth) * math.cos(elevation),
                    math.sin(azimuth) * math.cos(elevation),
                    math.sin(elevation),
                ]
            )
            # Cheap look before the costly thickness solve: is this cap clearly taken?
            if not all(_cap_may_be_clear(head, axis, max(extent), other) for other in placed):
                yield None, "it overlaps another lesion"
                continue
        if abs(axis[2]) > 0.95:
            yield None, "its direction is too close to the vertex"
            continue
        # Every direction of the cap lies within max(extent) of the axis, so this keeps it off the midline.
        max_extent = min(math.asin(min(abs(float(axis[0])), 1.0)) - math.radians(2.0), math.radians(80.0))
        if max(extent) > max_extent:
            yield None, "it would cross the midline (falx): put it more lateral"
            continue
        yield (
            _extra_axial(
                kind, head, axis=axis, extent_rad=extent, max_extent_rad=max_extent, volume_ml=volume, density=density
            ),
            "",
        )


def _cap_may_be_clear(head: HeadModel, axis: F64, half_angle: float, other: Lesion) -> bool:
    """False when a cap of directions around ``axis`` surely meets ``other``'s cone of directions
    and ``other`` reaches within 40 mm of the inner table (the thickest band allowed)."""
    h = np.asarray(head.inner_table.center_mm)
    if isinstance(other, ExtraAxialLesion):
        return _angle(axis, other.axis) > half_angle + other.cone_half_angle_rad
    if _across_midline(head, float(axis[0]), other):
        return True
    oc = np.asarray(other.center_mm) - h
    dist = float(np.linalg.norm(oc))
    if dist > other.bounding_radius_mm and _angle(axis, oc) > half_angle + math.asin(other.bounding_radius_mm / dist):
        return True
    return _min_depth(head, other) > 41.0


def _across_midline(head: HeadModel, axis_x: float, other: Lesion) -> bool:
    """True when ``other`` lies wholly on the far side of the midline from a cap whose axis has
    x component ``axis_x``. A cap never crosses the midline (see ``max_extent``), so every
    point of its band is on the axis's side; ``other`` is judged by its surface points."""
    x = other.surface_points()[:, 0] - head.inner_table.center_mm[0]
    return bool(np.all(x * math.copysign(1.0, axis_x) < 0.0))


def _touches_ventricles(head: HeadModel, lesion: Lesion) -> bool:
    pts = SampleGrid.from_points(np.concatenate([lesion.surface_points(), np.asarray([lesion.center_mm])]))
    return bool(np.any(head.ventricle_mask(pts)))


def build_lesions(specs: tuple[LesionSpec, ...], *, head: HeadModel, rng: np.random.Generator) -> tuple[Lesion, ...]:
    """Build every lesion in order, each clear of those before it (see :func:`build_lesion`)."""
    placed: tuple[Lesion, ...] = ()
    for spec in specs:
        placed = (*placed, build_lesion(spec, head=head, rng=rng, placed=placed))
    return placed
