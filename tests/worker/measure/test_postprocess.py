"""Threshold, small components and the skull-enclosed space, on synthetic heads and the real GE scan."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.helpers.series_builders import ring_skull_slice
from worker.core.errors import ErrorCode, StudyError
from worker.measure.postprocess import binarize, intracranial_mask, postprocess, remove_small_components


def test_binarize_is_strictly_above_threshold_and_nan_is_background() -> None:
    probabilities = np.array([[[0.2, 0.5, 0.5000001, 1.0, np.nan]]], dtype=np.float32)
    mask = binarize(probabilities, threshold=0.5)
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, [[[0, 0, 1, 1, 0]]])


def test_binarize_rejects_a_threshold_outside_zero_one() -> None:
    with pytest.raises(ValueError, match="threshold"):
        binarize(np.zeros((1, 2, 2)), threshold=1.5)


def test_small_components_are_measured_with_the_slab_rule() -> None:
    mask = np.zeros((4, 20, 20), dtype=np.uint8)
    mask[0, 2:4, 2:7] = 1  # 10 px on a 10 mm slab: 100 mm^3 = 0.1 mL
    mask[3, 10:12, 10:15] = 1  # 10 px on a 1 mm slab: 10 mm^3 = 0.01 mL
    slabs = np.array([10.0, 5.0, 3.0, 1.0])
    out = remove_small_components(mask, pixel_spacing_mm=(1.0, 1.0), slab_thickness_mm=slabs, min_volume_ml=0.05)
    assert out.dtype == np.uint8
    assert out[0].sum() == 10
    assert out[3].sum() == 0


def test_components_touching_only_at_a_corner_across_slices_are_one_26_connected_component() -> None:
    mask = np.zeros((2, 6, 6), dtype=np.uint8)
    mask[0, 1, 1] = 1
    mask[1, 2, 2] = 1  # diagonal neighbour in 3-D
    # Each voxel is 0.03 mL on its own, together 0.06 mL.
    out = remove_small_components(
        mask, pixel_spacing_mm=(1.0, 1.0), slab_thickness_mm=np.array([30.0, 30.0]), min_volume_ml=0.05
    )
    np.testing.assert_array_equal(out, mask)


def test_component_of_exactly_the_minimum_volume_is_kept() -> None:
    mask = np.zeros((1, 10, 10), dtype=np.uint8)
    mask[0, :5, :2] = 1  # 10 px * 0.5 * 0.4 mm^2 * 5 mm = 10 mm^3 = 0.01 mL
    out = remove_small_components(
        mask, pixel_spacing_mm=(0.5, 0.4), slab_thickness_mm=np.array([5.0]), min_volume_ml=0.01
    )
    assert out.sum() == 10
    out = remove_small_components(
        mask, pixel_spacing_mm=(0.5, 0.4), slab_thickness_mm=np.array([5.0]), min_volume_ml=0.0101
    )
    assert out.sum() == 0


def test_zero_minimum_keeps_everything_as_zero_one() -> None:
    mask = np.zeros((1, 4, 4), dtype=np.uint8)
    mask[0, 0, 0] = 7
    out = remove_small_components(mask, pixel_spacing_mm=(1.0, 1.0), slab_thickness_mm=np.ones(1), min_volume_ml=0)
    np.testing.assert_array_equal(out, (mask > 0).astype(np.uint8))


def _synthetic_head(*, spacing_mm: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Three slices: a closed skull with blood inside and outside, an open skull, no bone."""
    closed = ring_skull_slice()
    closed[40:50, 40:50] = 70.0  # blood inside the skull
    closed[46:50, 88:92] = 70.0  # blood-density tissue in the scalp, outside the ring
    open_ring = ring_skull_slice(gap_px=30)
    open_ring[40:50, 40:50] = 70.0
    no_bone = np.full((96, 96), 30.0, dtype=np.float32)
    hu = np.stack([closed, open_ring, no_bone])
    probabilities = np.zeros(hu.shape, dtype=np.float32)
    probabilities[hu == 70.0] = 0.9
    return hu, probabilities


def test_intracranial_mask_is_the_inside_of_a_closed_ring() -> None:
    hu, _ = _synthetic_head()
    inside = intracranial_mask(hu, pixel_spacing_mm=(1.0, 1.0))
    assert inside.dtype == np.uint8
    yy, xx = np.mgrid[:96, :96]
    r = np.hypot(yy - 47.5, xx - 47.5)
    # Brain (r < 36) eroded by about 1 mm: everything within r < 34 is inside, nothing at r >= 36.
    assert inside[0][r < 34].all()
    assert not inside[0][r >= 36].any()
    assert not inside[1].any(), "a ring with a 30 mm opening encloses nothing"
    assert not inside[2].any(), "a slice without bone encloses nothing"


def test_blood_inside_the_skull_is_kept_and_outside_removed() -> None:
    hu, probabilities = _synthetic_head()
    mask = postprocess(
        probabilities,
        hu=hu,
        pixel_spacing_mm=(1.0, 1.0),
        slab_thickness_mm=np.full(3, 5.0),
        threshold=0.5,
        min_component_ml=0.0,
        restrict_to_intracranial=True,
    )
    assert mask[0, 40:50, 40:50].all()
    assert not mask[0, 46:50, 88:92].any()
    assert not mask[1].any()  # open skull: removed (the documented failure mode)
    unrestricted = postprocess(
        probabilities,
        hu=hu,
        pixel_spacing_mm=(1.0, 1.0),
        slab_thickness_mm=np.full(3, 5.0),
        threshold=0.5,
        min_component_ml=0.0,
        restrict_to_intracranial=False,
    )
    np.testing.assert_array_equal(unrestricted, (probabilities > 0.5).astype(np.uint8))


def test_gap_bridging_radius_is_in_millimetres_not_pixels() -> None:
    # The same 14-pixel slot in the skull is 7 mm at 0.5 mm pixels (closed by the 5 mm
    # gap bridge) and 14 mm at 1 mm pixels (left open).
    hu = ring_skull_slice(gap_px=14)[None]
    assert intracranial_mask(hu, pixel_spacing_mm=(0.5, 0.5)).sum() > 2000
    assert intracranial_mask(hu, pixel_spacing_mm=(1.0, 1.0)).sum() == 0


def test_small_enclosed_pockets_are_dropped() -> None:
    hu = np.full((1, 64, 64), 20.0, dtype=np.float32)
    hu[0, 20:30, 20:30] = 1000.0
    hu[0, 23:27, 23:27] = 30.0  # a 4 x 4 mm hole inside bone (a diploic space)
    assert intracranial_mask(hu, pixel_spacing_mm=(1.0, 1.0)).sum() == 0


def test_unusable_pixel_spacing_is_a_study_error() -> None:
    with pytest.raises(StudyError) as info:
        intracranial_mask(np.zeros((1, 8, 8), dtype=np.float32), pixel_spacing_mm=(0.0, 0.5))
    assert info.value.code is ErrorCode.INVALID_GEOMETRY


def _read_real_series(folder: Path) -> tuple[np.ndarray, tuple[float, float]]:
    datasets = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
    iop = np.asarray(datasets[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    datasets.sort(key=lambda d: float(normal @ np.asarray(d.ImagePositionPatient, dtype=float)))
    hu = np.stack(
        [d.pixel_array.astype(np.float32) * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in datasets]
    )
    spacing = tuple(float(v) for v in datasets[0].PixelSpacing)
    return hu, (spacing[0], spacing[1])


@pytest.mark.realdata
def test_real_head_ct_mid_slices_cover_the_brain_and_exclude_the_skull(real_ge_ct: Path) -> None:
    hu, spacing = _read_real_series(real_ge_ct)
    inside = intracranial_mask(hu, pixel_spacing_mm=spacing)
    areas_cm2 = inside.sum(axis=(1, 2)) * spacing[0] * spacing[1] / 100.0
    n = hu.shape[0]
    mid = range(int(0.4 * n), int(0.7 * n))
    for i in mid:
        assert 80.0 <= areas_cm2[i] <= 200.0, f"slice {i}: {areas_cm2[i]:.1f} cm^2"
        # Brain only: the median inside is soft tissue, and no pixel is bone.
        assert 15.0 <= float(np.median(hu[i][inside[i] > 0])) <= 45.0
    assert not (inside.astype(bool) & (hu > 400)).any(), "skull or dense bone inside the mask"
    assert areas_cm2[-1] == 0.0, "the top slice holds only the vertex of the skull"


def test_keep_intracranial_equals_the_full_rule_and_skips_empty_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    import worker.measure.postprocess as pp

    hu = np.stack([ring_skull_slice(), ring_skull_slice(), ring_skull_slice(gap_px=30)])
    mask = np.zeros(hu.shape, dtype=np.uint8)
    mask[0] = 1  # everything on slice 0: inside and outside the ring
    mask[2, 10:20, 10:20] = 1  # open ring: nothing is intracranial there
    full = mask & intracranial_mask(hu, pixel_spacing_mm=(1.0, 1.0))
    seen: list[int] = []
    real = pp.intracranial_mask

    def counting(hu_part: np.ndarray, **kwargs: object) -> np.ndarray:
        seen.append(hu_part.shape[0])
        return real(hu_part, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pp, "intracranial_mask", counting)
    fast = pp.keep_intracranial(mask, hu=hu, pixel_spacing_mm=(1.0, 1.0))
    np.testing.assert_array_equal(fast, full)
    assert seen == [2], "slice 1 has no prediction and must not be processed"
    assert fast[0].any() and not fast[0].all() and not fast[2].any()


def test_remove_small_components_in_a_corner_of_a_large_volume() -> None:
    mask = np.zeros((6, 64, 64), dtype=np.uint8)
    mask[4:6, 60:64, 60:64] = 1  # 32 voxels of 1 mm^3 x 5 mm slabs = 0.16 mL
    mask[0, 0, 0] = 1  # 5 mm^3
    kept = remove_small_components(
        mask, pixel_spacing_mm=(1.0, 1.0), slab_thickness_mm=np.full(6, 5.0), min_volume_ml=0.1
    )
    assert kept.shape == mask.shape and kept.sum() == 32 and kept[5, 63, 63] == 1 and kept[0, 0, 0] == 0
