"""Slice normal, projections, slab thicknesses, tilt and the voxel-to-patient affines."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.helpers.dicom_builders import (
    AXIAL,
    SAGITTAL,
    positions_along_normal,
    tilted_orientation,
    write_ct_series,
)
from worker.core.errors import ErrorCode, StudyError
from worker.imaging import geometry
from worker.imaging.dicom_load import load_study
from worker.imaging.series_selection import SelectionRules

GE_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 0.9483237, -0.3173047)  # the real GE series, +18.5 deg


def test_slice_normal_of_axial_and_tilted_orientations() -> None:
    np.testing.assert_allclose(geometry.slice_normal(AXIAL[:3], AXIAL[3:]), [0.0, 0.0, 1.0])
    normal = geometry.slice_normal(GE_ORIENTATION[:3], GE_ORIENTATION[3:])
    np.testing.assert_allclose(normal, [0.0, 0.3173047, 0.9483237], atol=1e-6)
    assert np.linalg.norm(normal) == pytest.approx(1.0)
    # Sagittal: rows along +y, columns along -z -> normal along -x.
    np.testing.assert_allclose(geometry.slice_normal(SAGITTAL[:3], SAGITTAL[3:]), [-1.0, 0.0, 0.0], atol=1e-12)


@pytest.mark.parametrize(
    ("row", "col"),
    [
        ((0.0, 0.0, 0.0), (0.0, 1.0, 0.0)),  # zero vector
        ((1.0, 0.0, 0.0), (1.0, 0.0, 0.0)),  # parallel
        ((1.0, 0.0, 0.0), (0.0, 2.0, 0.0)),  # not unit
        ((np.nan, 0.0, 0.0), (0.0, 1.0, 0.0)),
    ],
)
def test_slice_normal_rejects_degenerate_cosines(row: tuple[float, ...], col: tuple[float, ...]) -> None:
    with pytest.raises(StudyError) as info:
        geometry.slice_normal(row, col)
    assert info.value.code is ErrorCode.INVALID_GEOMETRY


def test_project_positions_measures_along_the_tilted_normal() -> None:
    normal = geometry.slice_normal(GE_ORIENTATION[:3], GE_ORIENTATION[3:])
    # GE moves the table along z: 4.22 mm steps in z are 4.22 * cos(18.5 deg) apart along the normal.
    ipp = np.array([[-125.0, -123.54, 5.836 + 4.22 * i] for i in range(3)])
    positions = geometry.project_positions(ipp, normal)
    np.testing.assert_allclose(np.diff(positions), 4.22 * 0.9483237, rtol=1e-6)


def test_slab_thicknesses_even_spacing_is_the_spacing() -> None:
    np.testing.assert_allclose(geometry.slab_thicknesses([0.0, 5.0, 10.0, 15.0]), [5.0, 5.0, 5.0, 5.0])


def test_slab_thicknesses_are_half_gaps_with_uneven_spacing() -> None:
    positions = [0.0, 1.0, 4.0, 10.0]  # gaps 1, 3, 6
    slabs = geometry.slab_thicknesses(positions)
    np.testing.assert_allclose(slabs, [1.0, 2.0, 4.5, 6.0])
    # Sum = span + half of each end gap.
    assert slabs.sum() == pytest.approx(10.0 + (1.0 + 6.0) / 2)


@pytest.mark.parametrize("positions", [[1.0], [0.0, 2.0, 1.0], [0.0, 0.0, 1.0]])
def test_slab_thicknesses_refuse_unsorted_or_single(positions: list[float]) -> None:
    with pytest.raises(ValueError):
        geometry.slab_thicknesses(positions)


def test_tilt_deg() -> None:
    assert geometry.tilt_deg([0.0, 0.0, 1.0]) == pytest.approx(0.0)
    assert geometry.tilt_deg([0.0, 0.0, -1.0]) == pytest.approx(0.0)
    assert geometry.tilt_deg(geometry.slice_normal(GE_ORIENTATION[:3], GE_ORIENTATION[3:])) == pytest.approx(
        18.5, abs=0.01
    )
    assert geometry.tilt_deg([1.0, 0.0, 0.0]) == pytest.approx(90.0)


def test_uneven_spacing_warning_only_for_uneven_gaps() -> None:
    assert geometry.uneven_spacing_warning([0.0, 5.0, 10.0, 15.0 + 0.005]) is None
    message = geometry.uneven_spacing_warning([0.0, 1.08, 8.07, 15.06])
    assert message is not None
    assert "1.08 to 6.99 mm" in message and "mean step" in message and "\n" not in message


def _voxel_to(affine: np.ndarray, i: float, j: float, k: float) -> np.ndarray:
    return (affine @ np.array([i, j, k, 1.0]))[:3]


def test_voxel_to_lps_affine_maps_indices_to_patient_positions() -> None:
    orientation = tilted_orientation(18.5)
    row_cos, col_cos = np.array(orientation[:3]), np.array(orientation[3:])
    # Table moves along z: sheared stack, like a tilted gantry; spacing differs per axis.
    ipp = positions_along_normal(
        [0.0, 4.0, 8.0], orientation=orientation, origin_mm=(-60.0, -80.0, 20.0), shear_axis=(0, 0, 1)
    )
    spacing = (0.7, 0.4)  # (between rows, between columns)
    affine = geometry.voxel_to_lps_affine(
        first_position_mm=ipp[0],
        last_position_mm=ipp[-1],
        n_slices=3,
        row_cosine=orientation[:3],
        column_cosine=orientation[3:],
        pixel_spacing_mm=spacing,
    )
    for k in range(3):
        # First pixel of slice k is its ImagePositionPatient.
        np.testing.assert_allclose(_voxel_to(affine, 0, 0, k), ipp[k], atol=1e-9)
        # i = column: steps along the row cosine by the column spacing; j = row: column cosine, row spacing.
        expected = np.array(ipp[k]) + 5 * 0.4 * row_cos + 3 * 0.7 * col_cos
        np.testing.assert_allclose(_voxel_to(affine, 5, 3, k), expected, atol=1e-9)


def test_voxel_to_lps_affine_single_slice_uses_the_normal() -> None:
    affine = geometry.voxel_to_lps_affine(
        first_position_mm=(1.0, 2.0, 3.0),
        last_position_mm=(1.0, 2.0, 3.0),
        n_slices=1,
        row_cosine=AXIAL[:3],
        column_cosine=AXIAL[3:],
        pixel_spacing_mm=(0.5, 0.5),
        single_slice_thickness_mm=5.0,
    )
    np.testing.assert_allclose(affine[:3, 2], [0.0, 0.0, 5.0])
    with pytest.raises(ValueError):
        geometry.voxel_to_lps_affine(
            first_position_mm=(0, 0, 0),
            last_position_mm=(0, 0, 0),
            n_slices=1,
            row_cosine=AXIAL[:3],
            column_cosine=AXIAL[3:],
            pixel_spacing_mm=(0.5, 0.5),
        )


def test_nifti_affine_of_a_loaded_tilted_series(tmp_path: Path) -> None:
    orientation = tilted_orientation(18.5)
    ipp = positions_along_normal(
        [0.0, 5.0, 10.0, 15.0, 20.0],
        orientation=orientation,
        origin_mm=(-8.0, -9.0, 30.0),
        shear_axis=(0, 0, 1),
    )
    written = write_ct_series(
        tmp_path / "study", image_positions_mm=ipp, orientation=orientation, pixel_spacing_mm=(0.6, 0.45)
    )
    series = load_study(tmp_path / "study", rules=SelectionRules())
    ras = geometry.nifti_affine(series)
    flip = np.array([-1.0, -1.0, 1.0])
    for k, position in enumerate(written.image_positions_mm):
        np.testing.assert_allclose(_voxel_to(ras, 0, 0, k), flip * np.array(position), atol=1e-5)
    row_cos, col_cos = np.array(orientation[:3]), np.array(orientation[3:])
    expected = flip * (np.array(written.image_positions_mm[2]) + 7 * 0.45 * row_cos + 4 * 0.6 * col_cos)
    np.testing.assert_allclose(_voxel_to(ras, 7, 4, 2), expected, atol=1e-5)


def test_nifti_affine_axis_codes_and_data_order(tmp_path: Path) -> None:
    """A marked voxel in the (column, row, slice) NIfTI array lands where DICOM says it is."""
    written = write_ct_series(tmp_path / "study", rows=32, columns=32, pixel_spacing_mm=(0.5, 0.8))
    series = load_study(tmp_path / "study", rules=SelectionRules())
    affine = geometry.nifti_affine(series)
    assert nib.aff2axcodes(affine) == ("L", "P", "S")  # i -> +x LPS (left), j -> +y (posterior), k -> +z
    mask = np.zeros(series.hu.shape, dtype=np.uint8)  # (slice, row, column)
    mask[3, 10, 20] = 1
    image = nib.Nifti1Image(mask.transpose(2, 1, 0), affine)
    (i, j, k) = np.argwhere(np.asarray(image.dataobj) == 1)[0]
    ras = nib.affines.apply_affine(image.affine, (i, j, k))
    lps_expected = (
        np.array(written.image_positions_mm[3]) + 20 * 0.8 * np.array([1, 0, 0]) + 10 * 0.5 * np.array([0, 1, 0])
    )
    np.testing.assert_allclose(ras, lps_expected * np.array([-1, -1, 1]), atol=1e-5)
