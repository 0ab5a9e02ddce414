"""Fuzzy c-means and the seeded active contour on hand-built HU slices and on a phantom."""

from __future__ import annotations

import numpy as np
import pytest

from worker.research import baselines
from worker.research.metrics import confusion, overlap_scores


def _head(
    n_slices: int = 3, size: int = 64, *, blood_hu: float | None = 65.0, rim_hu: float | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HU slices: air, a bone ring, brain 30 HU with CSF 5 HU, and (optionally) a blood disc.

    Returns ``(hu, inside, blood)``: the intracranial space (inside the ring) and the disc.
    """
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    hu = np.full((size, size), -1000.0)
    hu[r < size * 0.45] = 1200.0  # bone
    inside = r < size * 0.40
    hu[inside] = 30.0
    hu[inside & (np.abs(xx - size / 2) < 2)] = 5.0  # a CSF cleft
    blood = np.hypot(yy - size * 0.4, xx - size * 0.6) < size * 0.1
    if blood_hu is not None:
        hu[blood] = blood_hu
        if rim_hu is not None:
            rim = blood & (np.hypot(yy - size * 0.4, xx - size * 0.6) >= size * 0.06)
            hu[rim] = rim_hu
    else:
        blood[:] = False
    stack = np.stack([hu + rng.normal(0, 3, hu.shape) for _ in range(n_slices)]).astype(np.float32)
    return stack, np.stack([inside] * n_slices).astype(np.uint8), np.stack([blood] * n_slices).astype(np.uint8)


def _dice(truth: np.ndarray, mask: np.ndarray) -> float:
    return overlap_scores(confusion(truth, mask))["dice"]


def test_fuzzy_cmeans_finds_separated_clusters_and_weights_act_as_counts() -> None:
    values = np.array([0.0, 1.0, 2.0, 10.0, 11.0, 12.0])
    result = baselines.fuzzy_cmeans(values, n_clusters=2)
    assert result.converged
    np.testing.assert_allclose(result.centres, [1.0, 11.0], atol=0.05)
    repeated = baselines.fuzzy_cmeans(np.repeat(values, [3, 1, 1, 1, 1, 3]), n_clusters=2)
    weighted = baselines.fuzzy_cmeans(values, n_clusters=2, weights=np.array([3, 1, 1, 1, 1, 3]))
    np.testing.assert_allclose(weighted.centres, repeated.centres, rtol=1e-6)
    with pytest.raises(ValueError, match="distinct"):
        baselines.fuzzy_cmeans(np.array([1.0, 1.0, 1.0]), n_clusters=2)


def test_fcm_memberships_sum_to_one_and_a_centre_owns_its_value() -> None:
    u = baselines.fcm_memberships(np.array([0.0, 2.5, 10.0]), np.array([0.0, 10.0]))
    np.testing.assert_allclose(u.sum(axis=1), 1.0)
    np.testing.assert_allclose(u[0], [1.0, 0.0])
    # d = 2.5 and 7.5, m = 2: u = (1/2.5^2) / (1/2.5^2 + 1/7.5^2) = 0.9
    assert u[1, 0] == pytest.approx(0.9)


def test_fcm_segment_finds_the_blood_cluster_inside_the_skull_only() -> None:
    hu, inside, blood = _head()
    hu[:, 2:6, 2:6] = 65.0  # "blood" density outside the skull: never hematoma
    mask = baselines.fcm_segment(hu, pixel_spacing_mm=(3.0, 3.0), intracranial=inside)
    assert _dice(blood, mask) > 0.9
    assert not mask[:, 2:6, 2:6].any()


def test_fcm_segment_calls_a_head_without_blood_blood_free() -> None:
    hu, inside, _ = _head(blood_hu=None)
    mask = baselines.fcm_segment(hu, pixel_spacing_mm=(3.0, 3.0), intracranial=inside)
    assert not mask.any()


def test_active_contour_grows_from_the_dense_core_to_the_whole_bleed() -> None:
    # The seed range (55-90 HU) only catches the 70 HU core; the 52 HU rim is found by evolution.
    hu, inside, blood = _head(blood_hu=70.0, rim_hu=52.0)
    core_only = (hu >= 55) & (hu <= 90) & (inside > 0)
    assert _dice(blood, core_only) < 0.7
    mask = baselines.active_contour_segment(hu, pixel_spacing_mm=(3.0, 3.0), intracranial=inside)
    assert _dice(blood, mask) > 0.85


def test_active_contour_without_a_seed_finds_nothing() -> None:
    hu, inside, _ = _head(blood_hu=None)
    assert not baselines.active_contour_segment(hu, pixel_spacing_mm=(3.0, 3.0), intracranial=inside).any()


def test_both_baselines_on_a_phantom_with_their_own_intracranial_mask() -> None:
    from worker.synth.phantom import LesionSpec, PhantomSpec, render_hu

    spec = PhantomSpec(
        rows=96,
        columns=96,
        pixel_spacing_mm=(2.4, 2.4),
        slice_thickness_mm=8.0,
        n_slices=12,
        lesions=(LesionSpec("round", volume_ml=30.0),),
    )
    hu, truth, _ = render_hu(spec, 5)
    for segment in (baselines.fcm_segment, baselines.active_contour_segment):
        mask = segment(hu, pixel_spacing_mm=(2.4, 2.4))
        assert mask.shape == truth.shape and mask.dtype == np.uint8
        assert _dice(truth, mask) > 0.8, segment.__name__


def test_baselines_need_a_volume() -> None:
    with pytest.raises(ValueError, match="slices, rows, columns"):
        baselines.fcm_segment(np.zeros((4, 4)), pixel_spacing_mm=(1.0, 1.0))
