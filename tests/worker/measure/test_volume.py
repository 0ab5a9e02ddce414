"""Planimetric volume and ABC/2 on hand-made masks with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.helpers.series_builders import make_ct_series
from worker.core.errors import ErrorCode, StudyError
from worker.measure.volume import Abc2, abc2, planimetric_volume_ml, slice_areas_mm2


def disc(rows: int, columns: int, *, radius_mm: float, spacing: tuple[float, float]) -> np.ndarray:
    """Pixels whose centre lies within ``radius_mm`` (physical) of the image centre."""
    yy, xx = np.mgrid[:rows, :columns].astype(float)
    y = (yy - (rows - 1) / 2) * spacing[0]
    x = (xx - (columns - 1) / 2) * spacing[1]
    return (np.hypot(x, y) <= radius_mm).astype(np.uint8)


def test_slice_areas_scale_rows_and_columns_by_their_own_spacing() -> None:
    mask = np.zeros((3, 8, 8), dtype=np.uint8)
    mask[0, :2, :5] = 1  # 10 pixels
    mask[2, 3, 3] = 255  # any non-zero counts
    areas = slice_areas_mm2(mask, pixel_spacing_mm=(0.5, 0.8))
    assert areas.dtype == np.float64
    np.testing.assert_allclose(areas, [10 * 0.4, 0.0, 0.4])


def test_planimetric_volume_uses_each_slices_slab_thickness() -> None:
    mask = np.zeros((3, 10, 10), dtype=bool)
    mask[0, :4, :5] = True  # 20 px
    mask[1, :2, :5] = True  # 10 px
    mask[2, :1, :1] = True  # 1 px
    slabs = np.array([2.0, 5.0, 7.0])
    volume = planimetric_volume_ml(mask, pixel_spacing_mm=(0.5, 0.5), slab_thickness_mm=slabs)
    expected_mm3 = 0.25 * (20 * 2.0 + 10 * 5.0 + 1 * 7.0)
    assert volume == pytest.approx(expected_mm3 / 1000.0, rel=1e-12)


def test_planimetric_volume_of_empty_mask_is_zero() -> None:
    mask = np.zeros((4, 6, 6), dtype=np.uint8)
    assert planimetric_volume_ml(mask, pixel_spacing_mm=(1.0, 1.0), slab_thickness_mm=np.full(4, 5.0)) == 0.0


def test_empty_mask_gives_zero_abc2_without_reference_slice() -> None:
    mask = np.zeros((3, 16, 16), dtype=np.uint8)
    result = abc2(mask, pixel_spacing_mm=(0.5, 0.5), slab_thickness_mm=np.full(3, 5.0))
    assert result == Abc2(volume_ml=0.0, a_mm=0.0, b_mm=0.0, c_mm=0.0, reference_slice=None)


def test_disc_on_several_slices_has_a_and_b_equal_to_its_diameter_within_a_pixel() -> None:
    spacing = (0.5, 0.5)
    radius_mm = 15.0
    one = disc(80, 80, radius_mm=radius_mm, spacing=spacing)
    mask = np.stack([one] * 5)
    slabs = np.array([5.0, 5.0, 4.0, 5.0, 5.0])
    result = abc2(mask, pixel_spacing_mm=spacing, slab_thickness_mm=slabs)
    pixel_diagonal = math.hypot(*spacing)
    assert abs(result.a_mm - 2 * radius_mm) <= pixel_diagonal
    assert abs(result.b_mm - 2 * radius_mm) <= pixel_diagonal
    assert result.c_mm == pytest.approx(24.0)  # every slice at 100 % of the largest
    assert result.reference_slice == 0  # equal areas: the lowest index
    assert result.volume_ml == pytest.approx(result.a_mm * result.b_mm * 24.0 / 2 / 1000)


def test_rectangle_a_is_the_diagonal_and_b_the_perpendicular_chord_through_the_centre() -> None:
    mask = np.zeros((1, 30, 40), dtype=np.uint8)
    mask[0, 5:15, 5:25] = 1  # 10 rows x 20 columns of 1 mm pixels: W = 20, H = 10 (pixel edges)
    result = abc2(mask, pixel_spacing_mm=(1.0, 1.0), slab_thickness_mm=np.array([5.0]))
    diagonal = math.hypot(20, 10)
    assert result.a_mm == pytest.approx(diagonal, rel=1e-12)
    assert result.b_mm == pytest.approx(10 * diagonal / 20, rel=1e-12)
    # Not the width of the rectangle across the diagonal (2 W H / D):
    assert result.b_mm != pytest.approx(2 * 20 * 10 / diagonal, rel=1e-3)
    assert result.volume_ml == pytest.approx(diagonal * (diagonal / 2) * 5.0 / 2 / 1000, rel=1e-12)


def test_square_b_is_the_other_diagonal() -> None:
    mask = np.zeros((1, 20, 20), dtype=np.uint8)
    mask[0, 3:15, 3:15] = 1
    result = abc2(mask, pixel_spacing_mm=(0.5, 0.5), slab_thickness_mm=np.array([5.0]))
    assert result.a_mm == pytest.approx(6 * math.sqrt(2), rel=1e-12)
    assert result.b_mm == pytest.approx(result.a_mm, rel=1e-12)


def test_anisotropic_pixels_are_measured_in_millimetres() -> None:
    # 10 rows x 10 columns of pixels, rows 2 mm apart and columns 0.5 mm apart: 20 mm tall, 5 mm wide.
    mask = np.zeros((1, 16, 16), dtype=np.uint8)
    mask[0, 3:13, 3:13] = 1
    result = abc2(mask, pixel_spacing_mm=(2.0, 0.5), slab_thickness_mm=np.array([3.0]))
    diagonal = math.hypot(20.0, 5.0)
    assert result.a_mm == pytest.approx(diagonal, rel=1e-12)
    assert result.b_mm == pytest.approx(5.0 * diagonal / 20.0, rel=1e-12)
    # The same physical shape on square pixels gives the same diameters.
    square = np.zeros((1, 50, 20), dtype=np.uint8)
    square[0, 5:45, 5:15] = 1  # 40 rows x 10 columns of 0.5 mm pixels
    same = abc2(square, pixel_spacing_mm=(0.5, 0.5), slab_thickness_mm=np.array([3.0]))
    assert same.a_mm == pytest.approx(result.a_mm, rel=1e-12)
    assert same.b_mm == pytest.approx(result.b_mm, rel=1e-12)


def test_physical_circle_on_anisotropic_pixels_has_equal_a_and_b() -> None:
    spacing = (1.0, 0.4)
    one = disc(40, 100, radius_mm=15.0, spacing=spacing)
    result = abc2(one[None], pixel_spacing_mm=spacing, slab_thickness_mm=np.array([5.0]))
    assert abs(result.a_mm - 30.0) <= math.hypot(*spacing)
    assert abs(result.b_mm - 30.0) <= math.hypot(*spacing)


def test_c_weights_slices_at_exactly_75_and_25_percent() -> None:
    counts = [100, 75, 74, 25, 24, 0]
    mask = np.zeros((len(counts), 4, 100), dtype=np.uint8)
    for i, n in enumerate(counts):
        mask[i, 0, :n] = 1
    slabs = np.array([1.0, 2.0, 4.0, 8.0, 16.0, 32.0])
    result = abc2(mask, pixel_spacing_mm=(1.0, 1.0), slab_thickness_mm=slabs)
    # 100 % and 75 % weigh 1; 74 % and 25 % weigh 0.5; 24 % and 0 % weigh 0.
    assert result.c_mm == pytest.approx(1.0 + 2.0 + 0.5 * 4.0 + 0.5 * 8.0)
    assert result.reference_slice == 0


def test_reference_slice_is_the_largest_area_slice() -> None:
    mask = np.zeros((4, 30, 30), dtype=np.uint8)
    mask[0, 10:14, 10:14] = 1
    mask[2, 5:25, 8:12] = 1  # 80 px, the largest, 20 rows x 4 columns
    mask[3, 10:16, 10:16] = 1
    result = abc2(mask, pixel_spacing_mm=(1.0, 1.0), slab_thickness_mm=np.full(4, 5.0))
    assert result.reference_slice == 2
    assert result.a_mm == pytest.approx(math.hypot(20, 4), rel=1e-12)


def test_single_slice_c_is_its_slab_thickness() -> None:
    mask = np.zeros((1, 20, 20), dtype=np.uint8)
    mask[0, 4:10, 4:16] = 1
    result = abc2(mask, pixel_spacing_mm=(0.5, 0.5), slab_thickness_mm=np.array([7.5]))
    assert result.c_mm == 7.5
    assert result.reference_slice == 0
    assert result.volume_ml == pytest.approx(result.a_mm * result.b_mm * 7.5 / 2000)


def test_single_pixel_spans_its_own_diagonal() -> None:
    mask = np.zeros((1, 5, 5), dtype=np.uint8)
    mask[0, 2, 2] = 1
    result = abc2(mask, pixel_spacing_mm=(1.0, 2.0), slab_thickness_mm=np.array([5.0]))
    assert result.a_mm == pytest.approx(math.sqrt(5.0))
    assert result.b_mm == pytest.approx(math.sqrt(5.0) / 2)


def test_separate_bleeds_on_the_reference_slice_share_one_outline() -> None:
    mask = np.zeros((1, 10, 60), dtype=np.uint8)
    mask[0, 2:4, 2:4] = 1
    mask[0, 2:4, 50:52] = 1
    result = abc2(mask, pixel_spacing_mm=(1.0, 1.0), slab_thickness_mm=np.array([5.0]))
    assert result.a_mm == pytest.approx(math.hypot(50, 2), rel=1e-12)


def test_ellipsoid_matches_the_analytic_values_of_the_definition() -> None:
    spacing, slice_mm = (0.5, 0.5), 1.0
    a, b, c = 20.0, 12.0, 15.0  # semi-axes in mm: columns, rows, slice normal
    rows, columns = 56, 88
    z = np.arange(-20, 21) * slice_mm
    yy, xx = np.mgrid[:rows, :columns].astype(float)
    y = (yy - (rows - 1) / 2) * spacing[0]
    x = (xx - (columns - 1) / 2) * spacing[1]
    mask = ((x / a) ** 2 + (y / b) ** 2 + (z[:, None, None] / c) ** 2 <= 1).astype(np.uint8)
    slabs = np.full(z.size, slice_mm)

    true_ml = 4 / 3 * math.pi * a * b * c / 1000
    assert planimetric_volume_ml(mask, pixel_spacing_mm=spacing, slab_thickness_mm=slabs) == pytest.approx(
        true_ml, rel=0.02
    )
    result = abc2(mask, pixel_spacing_mm=spacing, slab_thickness_mm=slabs)
    assert result.reference_slice == 20  # z = 0
    assert result.a_mm == pytest.approx(2 * a, abs=math.hypot(*spacing))
    assert result.b_mm == pytest.approx(2 * b, abs=math.hypot(*spacing))
    # 25/75 % weighting of an ellipsoid: C = (1 + (sqrt(3) - 1) / 2) c, within a slice.
    assert result.c_mm == pytest.approx((1 + (math.sqrt(3) - 1) / 2) * c, abs=slice_mm)
    assert result.volume_ml == pytest.approx(2 * a * 2 * b * 1.366 * c / 2 / 1000, rel=0.08)
    assert 0.58 < result.volume_ml / true_ml < 0.72  # ~0.65: ABC/2 underestimates an ellipsoid


def test_shape_mismatch_is_a_programming_error() -> None:
    mask = np.zeros((3, 4, 4), dtype=np.uint8)
    with pytest.raises(ValueError, match="slab_thickness_mm"):
        planimetric_volume_ml(mask, pixel_spacing_mm=(1.0, 1.0), slab_thickness_mm=np.ones(2))
    with pytest.raises(ValueError, match="slices, rows, columns"):
        slice_areas_mm2(np.zeros((4, 4), dtype=np.uint8), pixel_spacing_mm=(1.0, 1.0))


@pytest.mark.parametrize("spacing", [(0.0, 0.5), (0.5, -1.0), (float("nan"), 0.5)])
def test_unusable_pixel_spacing_is_a_study_error(spacing: tuple[float, float]) -> None:
    mask = np.ones((1, 2, 2), dtype=np.uint8)
    with pytest.raises(StudyError) as info:
        abc2(mask, pixel_spacing_mm=spacing, slab_thickness_mm=np.array([5.0]))
    assert info.value.code is ErrorCode.INVALID_GEOMETRY


def test_zero_slab_thickness_is_a_study_error() -> None:
    mask = np.ones((2, 2, 2), dtype=np.uint8)
    with pytest.raises(StudyError) as info:
        planimetric_volume_ml(mask, pixel_spacing_mm=(1.0, 1.0), slab_thickness_mm=np.array([5.0, 0.0]))
    assert info.value.code is ErrorCode.INVALID_GEOMETRY


def test_uneven_gaps_count_each_slice_for_its_own_slab() -> None:
    # Slices at 0, 5, 7 and 15 mm along the normal: slabs 5, 3.5, 5 and 8 mm (21.5 mm in all:
    # the 15 mm span plus half the end gaps).
    hu = np.zeros((4, 20, 20), dtype=np.float32)
    series = make_ct_series(hu, pixel_spacing_mm=(0.5, 0.5), positions_mm=[0.0, 5.0, 7.0, 15.0])
    np.testing.assert_allclose(series.slab_thickness_mm, [5.0, 3.5, 5.0, 8.0])
    mask = np.zeros(hu.shape, dtype=np.uint8)
    mask[:, 5:15, 5:15] = 1  # a 25 mm^2 column through every slice
    volume = planimetric_volume_ml(
        mask, pixel_spacing_mm=series.pixel_spacing_mm, slab_thickness_mm=series.slab_thickness_mm
    )
    assert volume == pytest.approx(25.0 * 21.5 / 1000)
    result = abc2(mask, pixel_spacing_mm=series.pixel_spacing_mm, slab_thickness_mm=series.slab_thickness_mm)
    assert result.c_mm == pytest.approx(21.5)
