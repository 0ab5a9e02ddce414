"""mask.npz, mask.nii.gz and seg.dcm: written, read back with independent readers, compared."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from tests.helpers.series_builders import AXIAL, TILTED, ct_series_from_files, write_dicom_series
from worker.core.ct import CtSeries
from worker.core.errors import ErrorCode, StudyError
from worker.outputs.mask_files import SEG_SERIES_DESCRIPTION, write_mask_nifti, write_mask_npz, write_seg

# --- mask.npz ---------------------------------------------------------------------------


def test_npz_holds_a_zero_one_uint8_mask_and_the_uids_in_sorted_order(tmp_path: Path) -> None:
    mask = np.zeros((3, 4, 5), dtype=bool)
    mask[1, 2, 3] = True
    uids = ["1.2.3.1", "1.2.3.22", "1.2.3.333"]
    path = tmp_path / "mask.npz"
    write_mask_npz(path, mask=mask.astype(np.uint8) * 255, sop_instance_uids=uids)
    with np.load(path, allow_pickle=False) as data:
        assert set(data.files) == {"mask", "sop_instance_uids"}
        assert data["mask"].dtype == np.uint8
        np.testing.assert_array_equal(data["mask"], mask.astype(np.uint8))
        assert data["sop_instance_uids"].tolist() == uids


def test_npz_is_written_at_exactly_the_path_given(tmp_path: Path) -> None:
    path = tmp_path / "out" / "mask.bin"
    write_mask_npz(path, mask=np.zeros((1, 2, 2), dtype=np.uint8), sop_instance_uids=["1.2"])
    assert [p.name for p in path.parent.iterdir()] == ["mask.bin"]
    assert path.stat().st_mode & 0o777 == 0o644, "readable artefacts, not mkstemp's 0600"


def test_npz_refuses_a_uid_count_that_does_not_match_the_slices(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="2 SOP instance UIDs for a mask of 3 slices"):
        write_mask_npz(tmp_path / "m.npz", mask=np.zeros((3, 2, 2), dtype=np.uint8), sop_instance_uids=["1", "2"])
    assert not list(tmp_path.iterdir()), "nothing may be left behind"


# --- mask.nii.gz ------------------------------------------------------------------------


def test_nifti_voxel_maps_to_the_expected_ras_point(tmp_path: Path) -> None:
    # i (column) 0.8 mm towards -R (patient left), j (row) 0.5 mm towards -A (posterior),
    # k (slice) 5 mm superior: the usual axial LPS series written as RAS.
    affine = np.array(
        [
            [-0.8, 0.0, 0.0, 100.0],
            [0.0, -0.5, 0.0, 120.0],
            [0.0, 0.0, 5.0, -30.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    mask = np.zeros((4, 6, 7), dtype=np.uint8)  # (slices, rows, columns)
    mask[2, 1, 5] = 1
    mask[0, 4, 0] = 1
    path = tmp_path / "mask.nii.gz"
    write_mask_nifti(path, mask=mask, affine=affine)

    assert path.read_bytes()[:2] == b"\x1f\x8b", "gzip"
    image = nib.load(path)
    data = np.asarray(image.dataobj)
    assert data.dtype == np.uint8
    assert data.shape == (7, 6, 4)  # (column, row, slice)
    np.testing.assert_array_equal(data.transpose(2, 1, 0), mask)
    np.testing.assert_allclose(image.affine, affine)
    assert int(image.header["sform_code"]) == 1
    assert int(image.header["qform_code"]) == 1
    np.testing.assert_allclose(image.get_qform(), affine, atol=1e-5)
    # Column 5, row 1, slice 2 -> (100 - 4, 120 - 0.5, -30 + 10).
    assert data[5, 1, 2] == 1
    np.testing.assert_allclose(nib.affines.apply_affine(image.affine, (5, 1, 2)), [96.0, 119.5, -20.0])
    # Column 0, row 4, slice 0 -> (100, 120 - 2, -30).
    assert data[0, 4, 0] == 1
    np.testing.assert_allclose(nib.affines.apply_affine(image.affine, (0, 4, 0)), [100.0, 118.0, -30.0])


def test_sheared_affine_keeps_an_exact_sform_and_disables_the_qform(tmp_path: Path) -> None:
    # Gantry tilt: slices advance along z while the slice normal is tilted; the slice axis is
    # not orthogonal to the row and column axes.
    affine = np.array(
        [
            [-0.5, 0.0, 0.0, 10.0],
            [0.0, -0.474, 0.0, 5.0],
            [0.0, 0.159, 5.0, 7.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    mask = np.zeros((3, 4, 4), dtype=np.uint8)
    mask[1, 2, 3] = 1
    path = tmp_path / "tilted.nii.gz"
    write_mask_nifti(path, mask=mask, affine=affine)
    image = nib.load(path)
    assert int(image.header["sform_code"]) == 1
    assert int(image.header["qform_code"]) == 0
    np.testing.assert_allclose(image.get_sform(), affine, atol=1e-6)
    np.testing.assert_allclose(image.affine, affine, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(image.dataobj).transpose(2, 1, 0), mask)


def test_nifti_refuses_a_matrix_that_is_not_an_affine(tmp_path: Path) -> None:
    mask = np.zeros((2, 2, 2), dtype=np.uint8)
    with pytest.raises(ValueError, match="4x4"):
        write_mask_nifti(tmp_path / "m.nii.gz", mask=mask, affine=np.eye(3))
    singular = np.eye(4)
    singular[2, 2] = 0.0
    with pytest.raises(ValueError, match="singular"):
        write_mask_nifti(tmp_path / "m.nii.gz", mask=mask, affine=singular)


# --- seg.dcm ----------------------------------------------------------------------------


def _series(
    tmp_path: Path, *, orientation: tuple, step_mm: tuple | None = None, anonymous: bool = False
) -> tuple[CtSeries, list[pydicom.Dataset]]:
    """A 5-slice 24 x 32 CT series on disk, read back header-only in sorted order."""
    hu = np.full((5, 24, 32), 30.0, dtype=np.float32)
    paths = write_dicom_series(
        tmp_path / "ct", hu=hu, orientation=orientation, step_mm=step_mm, anonymous_patient=anonymous
    )
    series, datasets = ct_series_from_files(paths, stop_before_pixels=True)
    assert all("PixelData" not in d for d in datasets)
    return series, datasets


def _frames_by_source(seg: hd.seg.Segmentation, datasets: list[pydicom.Dataset]) -> np.ndarray:
    uids = [str(d.SOPInstanceUID) for d in datasets]
    return np.asarray(
        seg.get_pixels_by_source_instance(
            source_sop_instance_uids=uids,
            segment_numbers=[1],
            combine_segments=True,
            assert_missing_frames_are_empty=True,
        )
    )


@pytest.mark.parametrize(
    ("orientation", "step_mm"),
    [(AXIAL, None), (TILTED, (0.0, 0.0, 5.0))],
    ids=["axial", "gantry-tilt"],
)
def test_seg_round_trips_frame_by_frame_and_references_the_sources(
    tmp_path: Path, orientation: tuple, step_mm: tuple | None
) -> None:
    _, datasets = _series(tmp_path, orientation=orientation, step_mm=step_mm)
    mask = np.zeros((5, 24, 32), dtype=np.uint8)
    mask[1, 3:9, 4:12] = 1
    mask[3, 10:20, 15:30] = 1
    mask[3, 0, 0] = 1
    path = tmp_path / "seg.dcm"
    write_seg(path, mask=mask, source_images=datasets, model_name="DR-UNet", model_version="2024.1")

    seg = hd.seg.segread(path)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.SegmentationType == "BINARY"
    assert seg.SeriesDescription == SEG_SERIES_DESCRIPTION
    assert seg.SeriesNumber == 901
    assert seg.StudyInstanceUID == datasets[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == datasets[0].FrameOfReferenceUID
    assert seg.SeriesInstanceUID != datasets[0].SeriesInstanceUID
    assert seg.NumberOfFrames == 2, "empty frames are omitted"
    # Every frame derives from the right source image.
    derived = [
        frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        for frame in seg.PerFrameFunctionalGroupsSequence
    ]
    assert sorted(derived) == sorted([datasets[1].SOPInstanceUID, datasets[3].SOPInstanceUID])
    referenced = {
        item.ReferencedSOPInstanceUID
        for series_item in seg.ReferencedSeriesSequence
        for item in series_item.ReferencedInstanceSequence
    }
    assert referenced == {d.SOPInstanceUID for d in datasets}
    np.testing.assert_array_equal(_frames_by_source(seg, datasets), mask)

    (segment,) = seg.SegmentSequence
    assert segment.SegmentLabel == "Hematoma"
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    category = hd.sr.CodedConcept.from_dataset(segment.SegmentedPropertyCategoryCodeSequence[0])
    kind = hd.sr.CodedConcept.from_dataset(segment.SegmentedPropertyTypeCodeSequence[0])
    assert category == codes.SCT.MorphologicallyAbnormalStructure
    assert kind == codes.SCT.Hematoma
    assert (kind.value, kind.scheme_designator) == ("35566002", "SCT")
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "DR-UNet"
    assert algorithm.AlgorithmVersion == "2024.1"
    family = hd.sr.CodedConcept.from_dataset(algorithm.AlgorithmFamilyCodeSequence[0])
    assert family == codes.cid7162.ArtificialIntelligence


def test_seg_frames_sit_at_the_source_planes_of_a_tilted_series(tmp_path: Path) -> None:
    series, datasets = _series(tmp_path, orientation=TILTED, step_mm=(0.0, 0.0, 5.0))
    mask = np.zeros((5, 24, 32), dtype=np.uint8)
    mask[2, 5:8, 5:8] = 1
    path = tmp_path / "seg.dcm"
    write_seg(path, mask=mask, source_images=datasets, model_name="DR-UNet", model_version="1")
    seg = hd.seg.segread(path)
    (frame,) = seg.PerFrameFunctionalGroupsSequence
    position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
    np.testing.assert_allclose(position, [float(v) for v in datasets[2].ImagePositionPatient], atol=1e-4)
    orientation = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    np.testing.assert_allclose([float(v) for v in orientation], [*TILTED[0], *TILTED[1]], atol=1e-6)
    np.testing.assert_allclose(series.slab_thickness_mm, 5.0 * abs(series.normal[2]), rtol=1e-6)


def test_all_empty_mask_gives_a_valid_seg_with_one_empty_frame(tmp_path: Path) -> None:
    _, datasets = _series(tmp_path, orientation=AXIAL)
    mask = np.zeros((5, 24, 32), dtype=np.uint8)
    path = tmp_path / "seg.dcm"
    write_seg(path, mask=mask, source_images=datasets, model_name="DR-UNet", model_version="1")
    seg = hd.seg.segread(path)
    assert seg.NumberOfFrames == 1
    assert seg.SegmentSequence[0].SegmentLabel == "Hematoma"
    (frame,) = seg.PerFrameFunctionalGroupsSequence
    source = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
    assert source == datasets[0].SOPInstanceUID
    referenced = {
        item.ReferencedSOPInstanceUID
        for series_item in seg.ReferencedSeriesSequence
        for item in series_item.ReferencedInstanceSequence
    }
    assert referenced == {d.SOPInstanceUID for d in datasets}
    frames = _frames_by_source(seg, datasets)
    assert frames.shape == mask.shape
    assert not frames.any()


def test_seg_accepts_anonymised_headers_without_type2_patient_attributes(tmp_path: Path) -> None:
    _, datasets = _series(tmp_path, orientation=AXIAL, anonymous=True)
    assert "PatientBirthDate" not in datasets[0]
    mask = np.zeros((5, 24, 32), dtype=np.uint8)
    mask[0, 1:3, 1:3] = 1
    path = tmp_path / "seg.dcm"
    write_seg(path, mask=mask, source_images=datasets, model_name="DR-UNet", model_version="1")
    seg = pydicom.dcmread(path)
    assert seg.PatientName == "ANONYMOUS"
    assert seg.PatientID == "ANON"
    assert seg.PatientBirthDate == ""
    assert "PatientBirthDate" not in datasets[0], "the caller's datasets are not modified"


def test_seg_reads_an_unknown_character_set_as_latin1(tmp_path: Path) -> None:
    _, datasets = _series(tmp_path, orientation=AXIAL)
    first = datasets[0]
    first.SpecificCharacterSet = "ISO_IR 999"  # no such encoding; the bytes below are Latin-1
    first["PatientName"] = pydicom.DataElement(0x00100010, "PN", b"M\xfcller^J\xf6rg")
    mask = np.zeros((5, 24, 32), dtype=np.uint8)
    mask[1, 2:5, 2:5] = 1
    path = tmp_path / "seg.dcm"
    write_seg(path, mask=mask, source_images=datasets, model_name="DR-UNet", model_version="1")
    seg = pydicom.dcmread(path)
    assert str(seg.PatientName) == "M\u00fcller^J\u00f6rg"
    assert first.SpecificCharacterSet == "ISO_IR 999", "the caller's dataset is not modified"


def test_seg_without_frame_of_reference_is_a_study_error(tmp_path: Path) -> None:
    _, datasets = _series(tmp_path, orientation=AXIAL)
    del datasets[2].FrameOfReferenceUID
    with pytest.raises(StudyError) as info:
        write_seg(
            tmp_path / "seg.dcm",
            mask=np.ones((5, 24, 32), dtype=np.uint8),
            source_images=datasets,
            model_name="DR-UNet",
            model_version="1",
        )
    assert info.value.code is ErrorCode.MISSING_GEOMETRY
    assert "FrameOfReferenceUID" in info.value.message
    assert not (tmp_path / "seg.dcm").exists()


def test_seg_refuses_a_mask_that_does_not_match_the_sources(tmp_path: Path) -> None:
    _, datasets = _series(tmp_path, orientation=AXIAL)
    with pytest.raises(ValueError, match="4 source images for a mask of 5 slices"):
        write_seg(
            tmp_path / "seg.dcm",
            mask=np.zeros((5, 24, 32), dtype=np.uint8),
            source_images=datasets[:4],
            model_name="m",
            model_version="1",
        )
    with pytest.raises(ValueError, match="24x32"):
        write_seg(
            tmp_path / "seg.dcm",
            mask=np.zeros((5, 24, 31), dtype=np.uint8),
            source_images=datasets,
            model_name="m",
            model_version="1",
        )


@pytest.mark.realdata
def test_seg_on_the_real_tilted_series_from_header_only_datasets(real_ge_ct: Path, tmp_path: Path) -> None:
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(real_ge_ct.glob("*.dcm"))]
    iop = np.asarray(datasets[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    datasets.sort(key=lambda d: float(normal @ np.asarray(d.ImagePositionPatient, dtype=float)))
    assert "PatientBirthDate" not in datasets[0]  # an anonymised export
    mask = np.zeros((len(datasets), int(datasets[0].Rows), int(datasets[0].Columns)), dtype=np.uint8)
    mask[14:17, 200:240, 300:340] = 1
    path = tmp_path / "seg.dcm"
    write_seg(path, mask=mask, source_images=datasets, model_name="DR-UNet", model_version="1")
    seg = hd.seg.segread(path)
    assert seg.NumberOfFrames == 3
    np.testing.assert_array_equal(_frames_by_source(seg, datasets), mask)
