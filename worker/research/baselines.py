"""The paper's classical baselines, for comparison with DR-UNet: fuzzy c-means and an active contour.

Both work on a study's HU volume on its native grid, as :mod:`worker.core.ct` defines it:
``hu`` float HU ``(slices, rows, columns)`` in sorted order, ``pixel_spacing_mm``
``(between rows, between columns)`` mm. Both return a uint8 0/1 mask of the same shape and
never mark a pixel outside the skull-enclosed space (:func:`worker.measure.postprocess.intracranial_mask`,
computed here unless the caller passes it), so they are judged on the same ground as the
deployed pipeline. Neither is trained; each has a handful of documented constants.

Fuzzy c-means (:func:`fcm_segment`)
-----------------------------------
1. A 3x3 median filter per slice (FCM on raw intensities is notoriously noise-sensitive).
2. The voxels to cluster: intracranial and within ``tissue_range_hu`` (default 0-100 HU:
   CSF, brain and fresh blood; bone and calcification above, fat and air below, are never
   hematoma).
3. Standard FCM (Bezdek: fuzzifier ``m = 2``, ``n_clusters = 5``: CSF, white matter, two
   grey-matter / partial-volume classes and blood) on those intensities, pooled over the
   whole study. With four clusters the small blood class (1-2 % of the voxels) was absorbed
   by grey matter on phantoms; five separate it. It runs on
   the 1-HU histogram with counts as weights, which is exactly FCM on the intensities
   rounded to 1 HU and independent of the number of voxels. Centres start at evenly spaced
   quantiles of the intensities (deterministic).
4. Hematoma: voxels whose largest membership is the brightest cluster, provided that
   cluster's centre is at least ``min_blood_hu`` (default 50 HU, fresh blood); otherwise
   the study is called blood-free. A study without blood still has a brightest cluster,
   which is why the threshold exists; FCM's false alarms on partial-volume bone edges,
   the falx and noise are what the paper's comparison shows.

Active contour (:func:`active_contour_segment`)
-----------------------------------------------
Morphological Chan-Vese (Marquez-Neila et al., scikit-image), per slice:

1. The same median filter; the slice is cropped to the bounding box of its intracranial
   space.
2. Initial region: intracranial pixels within ``seed_range_hu`` (default 55-90 HU, the
   core of fresh blood), opened with a 3x3 cross to drop isolated noise pixels, keeping
   connected pieces of at least ``min_seed_area_mm2`` (default 10 mm^2). A slice without
   such a seed has no hematoma.
3. Evolution for ``iterations`` steps (default 40, smoothing 1, lambda1 = lambda2 = 1) on the
   intensity feature ``clip((HU - 20) / (90 - 20), 0, 1)`` with everything outside the
   intracranial space set to 0: the contour grows or shrinks from the seed to where the
   image is closer to the mean inside (blood) than to the mean outside (brain, CSF).
   Only the boundary moves, so regions not connected to a seed are never created.
4. The final region, restricted to the intracranial space.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt
from scipy import ndimage

from worker.core.ct import MaskArray
from worker.measure.postprocess import intracranial_mask

__all__ = [
    "FcmResult",
    "active_contour_segment",
    "fcm_memberships",
    "fcm_segment",
    "fuzzy_cmeans",
]

F64 = npt.NDArray[np.float64]

DEFAULT_TISSUE_RANGE_HU = (0.0, 100.0)
DEFAULT_MIN_BLOOD_HU = 50.0
DEFAULT_SEED_RANGE_HU = (55.0, 90.0)
FEATURE_RANGE_HU = (20.0, 90.0)


@dataclass(frozen=True)
class FcmResult:
    """Cluster centres (ascending) and how the iteration ended."""

    centres: F64  # (n_clusters,) ascending
    iterations: int
    converged: bool
    objective: float  # sum_i w_i sum_k u_ik^m (x_i - v_k)^2 at the end


def fcm_memberships(values: np.ndarray, centres: np.ndarray, *, m: float = 2.0) -> F64:
    """FCM memberships ``u_ik = 1 / sum_j (d_ik / d_ij)^(2 / (m - 1))``, shape ``(n, n_clusters)``.

    A value that coincides with a centre belongs to it entirely (membership 1).
    """
    x = np.asarray(values, dtype=np.float64).ravel()[:, None]
    v = np.asarray(centres, dtype=np.float64).ravel()[None, :]
    d = np.abs(x - v)
    exact = d == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = d ** (-2.0 / (m - 1.0))
        u = inv / inv.sum(axis=1, keepdims=True)
    hit = exact.any(axis=1)
    if hit.any():
        u[hit] = exact[hit] / exact[hit].sum(axis=1, keepdims=True)
    result: F64 = u
    return result


def fuzzy_cmeans(
    values: np.ndarray,
    *,
    n_clusters: int,
    weights: np.ndarray | None = None,
    m: float = 2.0,
    max_iter: int = 300,
    tol: float = 1e-6,
) -> FcmResult:
    """Fuzzy c-means (Bezdek) on scalar ``values`` ``(n,)`` with optional non-negative ``weights``.

    Alternates ``v_k = sum_i w_i u_ik^m x_i / sum_i w_i u_ik^m`` and the membership update of
    :func:`fcm_memberships` until no centre moves by more than ``tol`` (same units as the
    values) or ``max_iter`` iterations. Centres start at the weighted quantiles
    ``(k + 0.5) / n_clusters``.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    if w.shape != x.shape:
        raise ValueError(f"{w.size} weights for {x.size} values")
    if n_clusters < 2:
        raise ValueError(f"n_clusters must be at least 2, got {n_clusters}")
    if not m > 1.0:
        raise ValueError(f"the fuzzifier m must be > 1, got {m}")
    keep = w > 0
    x, w = x[keep], w[keep]
    if x.size < n_clusters or np.unique(x).size < n_clusters:
        raise ValueError(f"need at least {n_clusters} distinct values to find {n_clusters} clusters")
    order = np.argsort(x, kind="stable")
    cumulative = np.cumsum(w[order]) / w.sum()
    targets = (np.arange(n_clusters) + 0.5) / n_clusters
    centres = x[order][np.minimum(np.searchsorted(cumulative, targets), x.size - 1)].astype(np.float64)
    centres += np.arange(n_clusters) * 1e-6  # distinct even where quantiles coincide
    converged = False
    iteration = 0
    for iteration in range(1, max_iter + 1):  # noqa: B007 -- reported below
        u = fcm_memberships(x, centres, m=m)
        um = u**m * w[:, None]
        new = (um * x[:, None]).sum(axis=0) / um.sum(axis=0)
        shift = float(np.max(np.abs(new - centres)))
        centres = new
        if shift <= tol:
            converged = True
            break
    u = fcm_memberships(x, centres, m=m)
    objective = float((w[:, None] * u**m * (x[:, None] - centres[None, :]) ** 2).sum())
    order_c = np.argsort(centres)
    return FcmResult(centres=centres[order_c], iterations=iteration, converged=converged, objective=objective)


def _median3(hu: np.ndarray) -> npt.NDArray[np.float32]:
    out = np.empty(hu.shape, dtype=np.float32)
    for i in range(hu.shape[0]):
        out[i] = cv2.medianBlur(np.ascontiguousarray(hu[i], dtype=np.float32), 3)
    return out


def _inside(hu: np.ndarray, pixel_spacing_mm: tuple[float, float], intracranial: np.ndarray | None) -> MaskArray:
    if intracranial is None:
        return intracranial_mask(hu, pixel_spacing_mm=pixel_spacing_mm)
    if intracranial.shape != hu.shape:
        raise ValueError(f"intracranial mask {intracranial.shape} does not match hu {hu.shape}")
    inside: MaskArray = (np.asarray(intracranial) != 0).astype(np.uint8)
    return inside


def _check_hu(hu: np.ndarray) -> None:
    if hu.ndim != 3:
        raise ValueError(f"hu must have shape (slices, rows, columns), got {hu.shape}")


def fcm_segment(
    hu: np.ndarray,
    *,
    pixel_spacing_mm: tuple[float, float],
    n_clusters: int = 5,
    m: float = 2.0,
    tissue_range_hu: tuple[float, float] = DEFAULT_TISSUE_RANGE_HU,
    min_blood_hu: float = DEFAULT_MIN_BLOOD_HU,
    intracranial: np.ndarray | None = None,
) -> MaskArray:
    """Hematoma mask by fuzzy c-means on the intracranial intensities (rule: module docstring)."""
    _check_hu(hu)
    inside = _inside(hu, pixel_spacing_mm, intracranial)
    smooth = _median3(hu)
    low, high = tissue_range_hu
    candidates = (inside != 0) & (smooth >= low) & (smooth <= high)
    out = np.zeros(hu.shape, dtype=np.uint8)
    if not candidates.any():
        return out
    rounded = np.rint(smooth[candidates]).astype(np.int64)
    base = int(rounded.min())
    counts = np.bincount(rounded - base).astype(np.float64)
    levels = np.arange(counts.size, dtype=np.float64) + base
    if np.count_nonzero(counts) < n_clusters:
        return out
    result = fuzzy_cmeans(levels, weights=counts, n_clusters=n_clusters, m=m)
    brightest = result.centres[-1]
    if brightest < min_blood_hu:
        return out
    membership = fcm_memberships(levels, result.centres, m=m)
    is_blood_level = np.argmax(membership, axis=1) == n_clusters - 1
    blood = np.zeros(hu.shape, dtype=bool)
    blood[candidates] = is_blood_level[rounded - base]
    out[blood] = 1
    return out


def active_contour_segment(
    hu: np.ndarray,
    *,
    pixel_spacing_mm: tuple[float, float],
    seed_range_hu: tuple[float, float] = DEFAULT_SEED_RANGE_HU,
    min_seed_area_mm2: float = 10.0,
    iterations: int = 40,
    smoothing: int = 1,
    intracranial: np.ndarray | None = None,
) -> MaskArray:
    """Hematoma mask by a seeded morphological Chan-Vese active contour per slice (module docstring)."""
    from skimage.segmentation import morphological_chan_vese

    _check_hu(hu)
    inside = _inside(hu, pixel_spacing_mm, intracranial)
    smooth = _median3(hu)
    pixel_mm2 = float(pixel_spacing_mm[0]) * float(pixel_spacing_mm[1])
    min_seed_px = max(1, int(np.ceil(min_seed_area_mm2 / pixel_mm2)))
    f_low, f_high = FEATURE_RANGE_HU
    cross = ndimage.generate_binary_structure(2, 1)
    out = np.zeros(hu.shape, dtype=np.uint8)
    for i in range(hu.shape[0]):
        region = inside[i] != 0
        if not region.any():
            continue
        rows = np.flatnonzero(region.any(axis=1))
        cols = np.flatnonzero(region.any(axis=0))
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        box = region[r0:r1, c0:c1]
        image = smooth[i, r0:r1, c0:c1]
        seed = box & (image >= seed_range_hu[0]) & (image <= seed_range_hu[1])
        seed = ndimage.binary_opening(seed, structure=cross)
        labels, n = ndimage.label(seed)
        if n == 0:
            continue
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        keep = sizes >= min_seed_px
        keep[0] = False
        seed = keep[labels]
        if not seed.any():
            continue
        feature = np.clip((image - f_low) / (f_high - f_low), 0.0, 1.0).astype(np.float64)
        feature[~box] = 0.0
        evolved = morphological_chan_vese(  # type: ignore[no-untyped-call]
            feature, num_iter=iterations, init_level_set=seed.astype(np.int8), smoothing=smoothing
        )
        out[i, r0:r1, c0:c1] = (np.asarray(evolved) != 0) & box
    return out
