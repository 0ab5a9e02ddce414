"""Ground-truth masks from npz, NIfTI and DICOM SEG, aligned to the loader's sorted slices."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from worker.core.ct import CtSeries
from worker.core.errors import ErrorCode, StudyError
from worker.imaging import geometry
from worker.imaging.dicom_load import load_study, read_source_headers
from worker.imaging.ground_truth import find_truth_source, load_truth_mask
from worker.imaging.series_selection import SelectionRules
from worker.outputs import mask_files as outputs
from worker.synth.phantom import LesionSpec, PhantomSpec, PhantomTruth, generate_study

SPEC = PhantomSpec(
    rows=48,
    columns=40,  # not square: rows and columns must not be swapped
    pixel_spacing_mm=(4.4, 5.0),
    slice_thickness_mm=10.0,
    n_slices=10,
    gantry_tilt_deg=15.0,
    uneven=True,
    lesions=(LesionSpec("round", volume_ml=30.0),),
)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> tuple[PhantomTruth, Path]:
    root = tmp_path_factory.mktemp("truth")
    return generate_study(root / "study", spec=SPEC, seed=3), root


def _copy_without_truth(phantom: tuple[PhantomTruth, Path], name: str) -> tuple[Path, CtSeries]:
    truth, root = phantom
    study = root / name
    shutil.copytree(truth.study_dir, study)
    shutil.rmtree(study / "truth")
    return study, load_study(study, rules=SelectionRules())


def test_phantom_truth_npz_is_aligned_by_sop_instance_uid(phantom: tuple[PhantomTruth, Path]) -> None:
    truth, _ = phantom
    series = load_study(truth.study_dir, rules=SelectionRules())
    assert find_truth_source(truth.study_dir).kind == "npz"
    mask = load_truth_mask(truth.study_dir, series)
    assert mask.dtype == np.uint8 and mask.sum() > 0
    np.testing.assert_array_equal(mask, truth.mask)


def test_mask_npz_in_any_order_matches_and_missing_slices_are_refused(phantom: tuple[PhantomTruth, Path]) -> None:
    truth, _ = phantom
    study, series = _copy_without_truth(phantom, "shuffled")
    order = np.random.default_rng(1).permutation(series.n_slices)
    uids = [truth.sop_instance_uids[i] for i in order]
    outputs.write_mask_npz(study / "mask.npz", mask=truth.mask[order], sop_instance_uids=uids)
    np.testing.assert_array_equal(load_truth_mask(study, series), truth.mask)
    outputs.write_mask_npz(study / "mask.npz", mask=truth.mask[1:], sop_instance_uids=truth.sop_instance_uids[1:])
    with pytest.raises(StudyError, match="no mask for 1 of the 10 slices") as info:
        load_truth_mask(study, series)
    assert info.value.code == ErrorCode.INCONSISTENT_GEOMETRY


def test_non_binary_npz_mask_is_refused(phantom: tuple[PhantomTruth, Path]) -> None:
    truth, _ = phantom
    study, series = _copy_without_truth(phantom, "labels")
    np.savez(study / "mask.npz", mask=truth.mask * 3, sop_instance_uids=np.asarray(truth.sop_instance_uids))
    with pytest.raises(StudyError, match=r"mask\.npz: mask is not binary"):
        load_truth_mask(study, series)


def test_nifti_of_a_tilted_uneven_series_aligns_through_its_affine(phantom: tuple[PhantomTruth, Path]) -> None:
    truth, _ = phantom
    study, series = _copy_without_truth(phantom, "nifti")
    outputs.write_mask_nifti(study / "labels.nii.gz", mask=truth.mask, affine=geometry.nifti_affine(series))
    assert find_truth_source(study).kind == "nifti"
    np.testing.assert_array_equal(load_truth_mask(study, series), truth.mask)


def test_nifti_with_permuted_and_flipped_axes_aligns_too(phantom: tuple[PhantomTruth, Path]) -> None:
    truth, _ = phantom
    study, series = _copy_without_truth(phantom, "flipped")
    data = truth.mask.transpose(2, 1, 0)  # (column, row, slice)
    affine = geometry.nifti_affine(series)
    # Store (row, column reversed, slice) instead: permute the first two axes, flip the new second one.
    flipped = data.transpose(1, 0, 2)[:, ::-1, :] * np.uint8(2)
    n_columns = data.shape[0]
    new_affine = affine.copy()
    new_affine[:, 0] = affine[:, 1]
    new_affine[:, 1] = -affine[:, 0]
    new_affine[:3, 3] = affine[:3, 3] + affine[:3, 0] * (n_columns - 1)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(flipped), new_affine), study / "labels.nii.gz")
    np.testing.assert_array_equal(load_truth_mask(study, series), truth.mask)
    np.testing.assert_array_equal(load_truth_mask(study, series, labels=[2]), truth.mask)
    assert not load_truth_mask(study, series, labels=[1]).any()


def test_nifti_on_another_grid_is_refused(phantom: tuple[PhantomTruth, Path]) -> None:
    truth, _ = phantom
    study, series = _copy_without_truth(phantom, "shifted")
    affine = geometry.nifti_affine(series)
    affine[:3, 3] += affine[:3, 0] * 0.5  # half a column off
    outputs.write_mask_nifti(study / "labels.nii.gz", mask=truth.mask, affine=affine)
    with pytest.raises(StudyError, match="does not coincide") as info:
        load_truth_mask(study, series)
    assert info.value.code == ErrorCode.INCONSISTENT_GEOMETRY


def test_dicom_seg_frames_map_to_their_source_images(phantom: tuple[PhantomTruth, Path]) -> None:
    truth, _ = phantom
    study, series = _copy_without_truth(phantom, "seg")
    outputs.write_seg(
        study / "x" / "reference.dcm",
        mask=truth.mask,
        source_images=read_source_headers(series),
        model_name="reader",
        model_version="1",
    )
    reloaded = load_study(study, rules=SelectionRules())  # the SEG is a rejected series, not a problem
    assert any(r.series.modality == "SEG" for r in reloaded.selection.rejected)
    assert find_truth_source(study).kind == "seg"
    np.testing.assert_array_equal(load_truth_mask(study, reloaded), truth.mask)


def test_a_study_needs_exactly_one_truth(phantom: tuple[PhantomTruth, Path]) -> None:
    truth, _ = phantom
    study, series = _copy_without_truth(phantom, "none")
    with pytest.raises(StudyError, match="no ground-truth mask"):
        find_truth_source(study)
    outputs.write_mask_npz(study / "mask.npz", mask=truth.mask, sop_instance_uids=truth.sop_instance_uids)
    outputs.write_mask_nifti(study / "mask.nii.gz", mask=truth.mask, affine=geometry.nifti_affine(series))
    with pytest.raises(StudyError, match="more than one ground-truth file"):
        load_truth_mask(study, series)
