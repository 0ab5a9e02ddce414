"""Synthetic hematomas blended into one axial CT slice (real or synthetic anatomy), with exact masks.

Research use only, not for clinical use.

This is the 2-D counterpart of :mod:`worker.phantom_lesions`: it paints a hematoma into a
slice that already holds a head (for example a slice of the real GE head CT, which has no
hemorrhage), so one real scan gives many distinct training examples. Every kind the
DR-UNet paper covers is drawn:

* ``round`` / ``irregular`` intraparenchymal: an ellipse, or a union of 2-5 lobes with a
  ragged border; acute blood with smooth heterogeneity and, often, a hypodense edema rim;
* ``intraventricular``: the dependent (posterior) part of a ventricle's CSF filled with
  blood, or the whole ventricle cast;
* ``subdural``: a crescent under the inner table (thickness ``T cos^2(pi s / 2)`` along the
  arc, concave towards the brain);
* ``epidural``: a lens under the inner table (thickness ``T (1 - s^2)``, convex towards
  the brain), thicker and shorter than a subdural.

Mass effect: before the blood is painted, the slice's intracranial content is pushed away
from the lesion (a radial displacement ``u(r) = R^2 / (2 r)`` outside the lesion's
equivalent radius ``R``, as an incompressible expansion in the plane), fading to zero at
the skull so bone never moves.

Intensities (HU): acute blood 50-90 (mean drawn per lesion, heterogeneity 2-8 HU), with a
share of darker collections (hyperacute, anaemic or mixed subacute, 30-50 HU) because a
model that only ever sees bright blood calls those CSF; edema rim 12-25 HU; blood edges
are partial-volume blended (a Gaussian-blurred alpha), the mask is the unblurred shape.

Arrays: a slice is ``(rows, columns)`` float32 HU; rows run along the image column
direction (posterior for a standard axial slice: +y LPS), columns along the row direction
(+x, patient left). ``pixel_spacing_mm`` is ``(between rows, between columns)`` as in
:mod:`worker.ct`. Masks are uint8 0/1 of the same shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np
import numpy.typing as npt
from scipy import ndimage

if TYPE_CHECKING:
    from worker.synth.lesion_shapes import ShapeBank

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]

LESION_KINDS = ("round", "irregular", "intraventricular", "subdural", "epidural")
DEFAULT_KIND_WEIGHTS = {"round": 0.22, "irregular": 0.26, "intraventricular": 0.12, "subdural": 0.24, "epidural": 0.16}
ACUTE_HU = (50.0, 90.0)
DARK_HU = (30.0, 50.0)
RIM_HU = (12.0, 25.0)


@dataclass(frozen=True)
class LesionAppearance:
    """How inserted blood looks: mean HU ranges, heterogeneity (HU) and edge blur.

    The defaults are the v3 generator's; :meth:`measured` follows what real acute
    hematomas show (55-85 HU, fairly homogeneous, a sharp margin), with darker subacute
    collections kept for the extra-axial kinds only.
    """

    acute_hu: tuple[float, float] = ACUTE_HU
    dark_hu: tuple[float, float] = DARK_HU
    heterogeneity_hu: tuple[float, float] = (2.0, 8.0)
    edge_sigma: tuple[float, float] = (0.3, 0.9)  # x 0.6 mm, in pixels (partial-volume blur of the margin)
    swirl_fraction: float = 0.15
    dark_kinds: tuple[str, ...] = LESION_KINDS  # kinds that may be drawn dark

    @classmethod
    def measured(cls) -> LesionAppearance:
        return cls(
            acute_hu=(55.0, 85.0),
            dark_hu=DARK_HU,
            heterogeneity_hu=(1.0, 4.0),
            edge_sigma=(0.2, 0.5),
            swirl_fraction=0.08,
            dark_kinds=("subdural", "epidural"),
        )


@dataclass(frozen=True)
class InsertedLesion:
    """What was painted: kind, mean blood HU, area (mm^2) and centroid (row, column) in pixels."""

    kind: str
    mean_hu: float
    area_mm2: float
    centroid_px: tuple[float, float]


def smooth_noise(shape: tuple[int, int], *, scale_px: float, rng: np.random.Generator) -> F32:
    """Zero-mean, unit-variance Gaussian-filtered white noise of correlation length ``scale_px``."""
    noise = rng.standard_normal(shape).astype(np.float32)
    if scale_px > 0.3:
        noise = np.asarray(
            cv2.GaussianBlur(noise, (0, 0), sigmaX=scale_px, sigmaY=scale_px, borderType=cv2.BORDER_REFLECT),
            dtype=np.float32,
        )
    std = float(noise.std())
    out: F32 = noise / (std if std > 1e-6 else 1.0)
    return out


def brain_regions(hu: F32, intracranial: U8, *, pixel_spacing_mm: tuple[float, float]) -> tuple[F32, U8]:
    """Distance to the inner table (mm, 0 outside) and the ventricles (large central CSF pools).

    ``intracranial``: the skull-enclosed space (for a real slice, from
    :func:`worker.measure.postprocess.intracranial_mask`). Ventricles are 4-connected pixels under
    18 HU, at least 3 mm from the inner table, of at least 25 mm^2, whose centroid lies in
    the central half of the intracranial space.
    """
    row_mm, col_mm = pixel_spacing_mm
    inside = intracranial > 0
    if not inside.any():
        return np.zeros(hu.shape, np.float32), np.zeros(hu.shape, np.uint8)
    distance = ndimage.distance_transform_edt(inside, sampling=(row_mm, col_mm)).astype(np.float32)
    smooth = cv2.GaussianBlur(hu.astype(np.float32), (0, 0), sigmaX=0.6 / col_mm, sigmaY=0.6 / row_mm)
    csf = ((smooth < 18.0) & (smooth > -30.0) & (distance > 3.0)).astype(np.uint8)
    n, labels, stats, centroids = cv2.connectedComponentsWithStats(csf, connectivity=4)
    rows, cols = np.nonzero(inside)
    r0, r1, c0, c1 = rows.min(), rows.max(), cols.min(), cols.max()
    keep = np.zeros(n, dtype=bool)
    min_px = 25.0 / (row_mm * col_mm)
    for i in range(1, n):
        cx, cy = centroids[i]
        central = abs(cy - (r0 + r1) / 2) < 0.25 * (r1 - r0) and abs(cx - (c0 + c1) / 2) < 0.25 * (c1 - c0)
        keep[i] = stats[i, cv2.CC_STAT_AREA] >= min_px and central
    ventricles: U8 = keep[labels].astype(np.uint8)
    return distance, ventricles


def brain_space(
    hu: F32, intracranial: U8, *, pixel_spacing_mm: tuple[float, float], min_area_mm2: float = 1000.0
) -> U8:
    """Where blood may be painted: the intracranial space restricted to brain and CSF.

    On skull-base slices the skull-enclosed space also holds the orbits, sinuses and nasal
    cavity; blood painted there would teach the model that a globe can bleed. Brain here
    is: intracranial, smoothed HU between -5 and 75, in connected pieces of at least
    ``min_area_mm2`` (a globe is ~450 mm^2), holes filled. uint8 0/1, same shape.
    """
    row_mm, col_mm = pixel_spacing_mm
    smooth = cv2.GaussianBlur(hu.astype(np.float32), (0, 0), sigmaX=1.0 / col_mm, sigmaY=1.0 / row_mm)
    tissue = ((intracranial > 0) & (smooth > -5.0) & (smooth < 75.0)).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(tissue, connectivity=4)
    keep = np.zeros(n, dtype=bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] * row_mm * col_mm >= min_area_mm2
    filled = ndimage.binary_fill_holes(keep[labels]) & (intracranial > 0)
    out: U8 = filled.astype(np.uint8)
    return out


def _blood_field(
    shape: tuple[int, int],
    *,
    mean_hu: float,
    rng: np.random.Generator,
    pixel_mm: float,
    appearance: LesionAppearance = LesionAppearance(),
) -> tuple[F32, float]:
    """Blood HU: the mean plus a smooth heterogeneity (clot retraction, serum), and its sigma."""
    hetero = float(rng.uniform(*appearance.heterogeneity_hu))
    field = mean_hu + hetero * smooth_noise(shape, scale_px=float(rng.uniform(1.5, 5.0)) / pixel_mm, rng=rng)
    if rng.random() < appearance.swirl_fraction:  # a swirl of fresh, less dense blood within (active bleeding)
        field -= float(rng.uniform(8.0, 20.0)) * np.clip(
            smooth_noise(shape, scale_px=4.0 / pixel_mm, rng=rng) - 1.0, 0.0, None
        )
    return field.astype(np.float32), hetero


def _draw_mean_hu(
    kind: str, rng: np.random.Generator, *, dark_fraction: float, appearance: LesionAppearance = LesionAppearance()
) -> float:
    if kind in appearance.dark_kinds and rng.random() < dark_fraction:
        return float(rng.uniform(*appearance.dark_hu))
    low = max(55.0, appearance.acute_hu[0]) if kind == "epidural" else appearance.acute_hu[0]
    return float(rng.uniform(low, appearance.acute_hu[1]))


def _radial_push(
    shape: tuple[int, int],
    *,
    center_px: tuple[float, float],
    radius_px: float,
    strength: float,
    weight: F32,
) -> tuple[F32, F32]:
    """A remap (map_x, map_y) that pushes content away from ``center_px`` (row, col).

    Output pixel ``p`` samples the input at ``p - u(p)``, ``u = strength R^2 / (2 r)`` along
    ``p - c`` outside ``R`` (linear inside), times ``weight`` (0 at the skull).
    """
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    dy, dx = rows - center_px[0], cols - center_px[1]
    r = np.sqrt(dx * dx + dy * dy) + 1e-3
    mag = np.where(r > radius_px, radius_px * radius_px / (2.0 * r), r / 2.0) * strength * weight
    return (cols - mag * dx / r).astype(np.float32), (rows - mag * dy / r).astype(np.float32)


def _parenchymal_shape(
    kind: str, *, distance: F32, allowed: npt.NDArray[np.bool_], pixel_mm: float, rng: np.random.Generator
) -> tuple[npt.NDArray[np.bool_], tuple[float, float], float] | None:
    """A round or irregular intraparenchymal shape inside ``allowed``; ``None`` if none fits."""
    radius_mm = float(np.exp(rng.uniform(math.log(2.0), math.log(32.0))))
    for _ in range(6):
        candidates = np.argwhere(allowed & (distance > radius_mm + 3.0))
        if len(candidates):
            break
        radius_mm *= 0.7
    else:
        return None
    cy, cx = (float(v) for v in candidates[int(rng.integers(len(candidates)))])
    r_px = radius_mm / pixel_mm
    h, w = distance.shape
    half = math.ceil(r_px * 2.2) + 3
    y0, y1, x0, x1 = (
        max(int(cy) - half, 0),
        min(int(cy) + half + 1, h),
        max(int(cx) - half, 0),
        min(int(cx) + half + 1, w),
    )
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    field = np.full(yy.shape, np.inf, dtype=np.float32)
    n_lobes = 1 if kind == "round" else int(rng.integers(2, 6))
    for lobe in range(n_lobes):
        if lobe == 0:
            oy, ox, scale = 0.0, 0.0, 1.0
        else:
            angle = float(rng.uniform(0, 2 * math.pi))
            offset = float(rng.uniform(0.4, 0.9)) * r_px
            oy, ox, scale = offset * math.sin(angle), offset * math.cos(angle), float(rng.uniform(0.35, 0.75))
        a = r_px * scale * float(rng.uniform(0.75, 1.3))
        b = r_px * scale * float(rng.uniform(0.6, 1.0))
        t = float(rng.uniform(0, math.pi))
        dy, dx = yy - (cy + oy), xx - (cx + ox)
        u = (dx * math.cos(t) + dy * math.sin(t)) / a
        v = (-dx * math.sin(t) + dy * math.cos(t)) / b
        field = np.minimum(field, np.sqrt(u * u + v * v))
    if kind == "irregular":
        field = field + 0.18 * smooth_noise(field.shape, scale_px=max(r_px / 4.0, 1.0), rng=rng)
    local = field < 1.0
    shape = np.zeros(distance.shape, dtype=bool)
    shape[y0:y1, x0:x1] = local
    shape &= allowed
    if shape.sum() < 3:
        return None
    return shape, (cy, cx), r_px


def _extra_axial_shape(
    kind: str,
    *,
    distance: F32,
    inside: npt.NDArray[np.bool_],
    pixel_mm: float,
    rng: np.random.Generator,
) -> tuple[npt.NDArray[np.bool_], tuple[float, float], float] | None:
    """A subdural crescent or epidural lens under the inner table of this slice."""
    rows, cols = np.nonzero(inside)
    if len(rows) < 50:
        return None
    cy, cx = float(rows.mean()), float(cols.mean())
    h, w = distance.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = np.arctan2(yy - cy, xx - cx)
    theta0 = float(rng.uniform(-math.pi, math.pi))
    if kind == "subdural":
        extent = math.radians(float(rng.uniform(25.0, 80.0)))
        thickness_mm = float(np.exp(rng.uniform(math.log(2.0), math.log(22.0))))
    else:
        extent = math.radians(float(rng.uniform(15.0, 40.0)))
        thickness_mm = float(np.exp(rng.uniform(math.log(4.0), math.log(30.0))))
    delta = np.angle(np.exp(1j * (theta - theta0)))
    s = np.abs(delta) / extent
    profile = np.cos(0.5 * np.pi * np.minimum(s, 1.0)) ** 2 if kind == "subdural" else 1.0 - np.minimum(s, 1.0) ** 2
    wobble = 1.0 + 0.12 * smooth_noise((h, w), scale_px=8.0 / pixel_mm, rng=rng)
    t = np.where(s < 1.0, profile * thickness_mm * wobble, 0.0)
    shape = inside & (distance < t) & (distance > 0)
    if shape.sum() < 3:
        return None
    ys, xs = np.nonzero(shape)
    centroid = (float(ys.mean()), float(xs.mean()))
    r_px = math.sqrt(float(shape.sum()) / math.pi)
    return shape, centroid, r_px


def _ventricular_shape(
    ventricles: U8, *, rng: np.random.Generator
) -> tuple[npt.NDArray[np.bool_], tuple[float, float], float] | None:
    """Blood in a ventricle: the dependent (posterior, larger row) part, or the whole cast."""
    n, labels = cv2.connectedComponents(ventricles, connectivity=4)
    if n <= 1:
        return None
    chosen = [i for i in range(1, n) if rng.random() < 0.6] or [int(rng.integers(1, n))]
    shape = np.isin(labels, chosen)
    if rng.random() < 0.75:  # fluid level: supine patient, blood layers posteriorly
        ys = np.nonzero(shape)[0]
        level = float(np.quantile(ys, rng.uniform(0.2, 0.8)))
        shape &= np.arange(shape.shape[0])[:, None] >= level
    if shape.sum() < 3:
        return None
    ys, xs = np.nonzero(shape)
    return shape, (float(ys.mean()), float(xs.mean())), math.sqrt(float(shape.sum()) / math.pi)


def insert_lesions(
    *,
    hu: F32,
    intracranial: U8,
    pixel_spacing_mm: tuple[float, float],
    rng: np.random.Generator,
    n_lesions: int = 1,
    kinds: tuple[str, ...] | None = None,
    dark_fraction: float = 0.15,
    mass_effect: bool = True,
    existing_mask: U8 | None = None,
    appearance: LesionAppearance = LesionAppearance(),
    shapes: ShapeBank | None = None,
) -> tuple[F32, U8, tuple[InsertedLesion, ...]]:
    """Blend ``n_lesions`` synthetic hematomas into one HU slice; returns HU, mask and records.

    ``hu``: ``(rows, columns)`` float32 HU; ``intracranial``: uint8 0/1, the skull-enclosed
    space; blood is painted only in its brain part (:func:`brain_space`), never in orbits,
    sinuses or bone. ``kinds``: allowed kinds (default all, drawn with
    :data:`DEFAULT_KIND_WEIGHTS`); a kind that finds no room on this slice (no ventricle on
    a vertex slice, say) is skipped. ``existing_mask`` (a hematoma already present, e.g.
    from a 3-D phantom) is kept, moved with the mass effect, and new blood avoids it. The
    returned mask is the union (uint8 0/1); the input arrays are not modified.
    ``appearance``: blood densities and margins (:class:`LesionAppearance`); ``shapes``: real
    hemorrhage outlines (:class:`worker.synth.lesion_shapes.ShapeBank`), used for a share of the
    intraparenchymal lesions when given.
    """
    out = np.asarray(hu, dtype=np.float32).copy()
    mask = np.zeros(out.shape, dtype=bool) if existing_mask is None else existing_mask.astype(bool).copy()
    inside = brain_space(out, intracranial, pixel_spacing_mm=pixel_spacing_mm).astype(bool) | mask
    records: list[InsertedLesion] = []
    if not inside.any() or n_lesions <= 0:
        return out, mask.astype(np.uint8), ()
    pixel_mm = float(math.sqrt(pixel_spacing_mm[0] * pixel_spacing_mm[1]))
    allowed_kinds = kinds or LESION_KINDS
    weights = np.array([DEFAULT_KIND_WEIGHTS[k] for k in allowed_kinds], dtype=np.float64)
    weights /= weights.sum()
    for _ in range(n_lesions):
        kind = str(allowed_kinds[int(rng.choice(len(allowed_kinds), p=weights))])
        distance, ventricles = brain_regions(out, inside.astype(np.uint8), pixel_spacing_mm=pixel_spacing_mm)
        free = inside & ~mask
        found: tuple[npt.NDArray[np.bool_], tuple[float, float], float] | None
        if kind in ("round", "irregular"):
            tissue = free & (ventricles == 0)
            found = None
            if shapes is not None and rng.random() < shapes.share:
                found = shapes.place(distance=distance, allowed=tissue, pixel_mm=pixel_mm, rng=rng)
            if found is None:
                found = _parenchymal_shape(kind, distance=distance, allowed=tissue, pixel_mm=pixel_mm, rng=rng)
        elif kind == "intraventricular":
            found = _ventricular_shape((ventricles.astype(bool) & free).astype(np.uint8), rng=rng)
        else:
            found = _extra_axial_shape(kind, distance=distance, inside=free, pixel_mm=pixel_mm, rng=rng)
        if found is None:
            continue
        shape, centroid, r_px = found
        if mass_effect and kind != "intraventricular" and r_px * pixel_mm > 6.0:
            weight = np.clip(distance / 15.0, 0.0, 1.0).astype(np.float32)
            weight = cv2.GaussianBlur(weight, (0, 0), sigmaX=3.0) * (distance > 0)  # bone never moves
            strength = float(rng.uniform(0.3, 1.0))
            map_x, map_y = _radial_push(out.shape, center_px=centroid, radius_px=r_px, strength=strength, weight=weight)
            out = np.asarray(
                cv2.remap(out, map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE),
                dtype=np.float32,
            )
            moved = cv2.remap(
                mask.astype(np.float32), map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT
            )
            mask = (moved > 0.5) & inside
            shape &= ~mask
        mean_hu = _draw_mean_hu(kind, rng, dark_fraction=dark_fraction, appearance=appearance)
        blood, _ = _blood_field(out.shape, mean_hu=mean_hu, rng=rng, pixel_mm=pixel_mm, appearance=appearance)
        if kind in ("round", "irregular") and rng.random() < 0.7:
            rim_mm = float(rng.uniform(1.0, 6.0))
            ring = (
                (ndimage.distance_transform_edt(~shape, sampling=pixel_spacing_mm) < rim_mm)
                & ~shape
                & inside
                & ~mask
                & (out > 15.0)
                & (out < 60.0)
            )
            rim_hu = float(rng.uniform(*RIM_HU))
            soft = cv2.GaussianBlur(ring.astype(np.float32), (0, 0), sigmaX=max(0.8 / pixel_mm, 0.5))
            out = out * (1.0 - soft) + rim_hu * soft + 2.0 * smooth_noise(out.shape, scale_px=1.0, rng=rng) * soft
        sigma_px = float(rng.uniform(*appearance.edge_sigma)) * max(0.6 / pixel_mm, 0.5)
        alpha = cv2.GaussianBlur(shape.astype(np.float32), (0, 0), sigmaX=sigma_px)
        alpha = np.where(inside, np.maximum(alpha, shape.astype(np.float32) * 0.85), 0.0).astype(np.float32)
        out = out * (1.0 - alpha) + blood * alpha
        mask |= shape
        ys, xs = np.nonzero(shape)
        records.append(
            InsertedLesion(
                kind=kind,
                mean_hu=mean_hu,
                area_mm2=float(shape.sum()) * pixel_spacing_mm[0] * pixel_spacing_mm[1],
                centroid_px=(float(ys.mean()), float(xs.mean())),
            )
        )
    return out.astype(np.float32), mask.astype(np.uint8), tuple(records)
