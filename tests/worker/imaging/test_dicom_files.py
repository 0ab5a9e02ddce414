"""Walking a study folder and reading DICOM headers: what counts as a DICOM image, what is skipped."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MediaStorageDirectoryStorage, generate_uid

from tests.helpers.dicom_builders import set_unchecked, write_ct_series
from worker.core.errors import ErrorCode, StudyError
from worker.imaging import dicom_files
from worker.imaging.dicom_files import group_by_series, list_study_files, read_dataset, read_header, scan_study


def _error(study: Path, *, max_files: int = 100) -> StudyError:
    with pytest.raises(StudyError) as info:
        scan_study(study, max_files=max_files)
    assert "\n" not in info.value.message
    return info.value


def test_scan_finds_nested_images_and_ignores_everything_else(tmp_path: Path) -> None:
    written = write_ct_series(tmp_path, n_slices=4, nested=True)
    (tmp_path / "README.txt").write_text("exported by PACS\n")
    (tmp_path / "d0" / "notes.dcm").write_text("not dicom at all")
    (tmp_path / "empty.dcm").write_bytes(b"")
    (tmp_path / "noise.bin").write_bytes(np.random.default_rng(0).bytes(5000))
    # A DICOMDIR-like file: proper preamble and meta, but no image UIDs.
    dicomdir = Dataset()
    dicomdir.file_meta = FileMetaDataset()
    dicomdir.file_meta.MediaStorageSOPClassUID = MediaStorageDirectoryStorage
    dicomdir.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dicomdir.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dicomdir.FileSetID = "EXPORT"
    dicomdir.save_as(tmp_path / "DICOMDIR", enforce_file_format=True)

    scan = scan_study(tmp_path, max_files=100)
    assert scan.n_files == 4 + 5
    assert scan.n_ignored == 5
    assert sorted(h.sop_instance_uid for h in scan.headers) == sorted(written.sop_instance_uids)
    assert {h.series_instance_uid for h in scan.headers} == {written.series_instance_uid}
    assert all(h.has_pixel_data and not h.forced for h in scan.headers)


def test_header_values_are_parsed(tmp_path: Path) -> None:
    written = write_ct_series(tmp_path, n_slices=1, pixel_spacing_mm=(0.45, 0.5), slice_thickness_mm=2.5)
    header = read_header(written.paths[0], root=tmp_path)
    assert header is not None
    assert header.pixel_spacing_mm == (0.45, 0.5)
    assert header.image_orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert header.image_position_mm == pytest.approx(written.image_positions_mm[0])
    assert header.slice_thickness_mm == 2.5
    assert (header.rows, header.columns, header.samples_per_pixel) == (32, 32, 1)
    assert header.image_type == ("ORIGINAL", "PRIMARY", "AXIAL")
    assert header.modality == "CT" and header.series_number == 2
    assert header.transfer_syntax_uid == ExplicitVRLittleEndian


def test_malformed_geometry_reads_as_nan_and_absent_as_none(tmp_path: Path) -> None:
    def edit(ds: Dataset, i: int) -> None:
        set_unchecked(ds, "PixelSpacing", ["nan", "nan"])
        ds.ImagePositionPatient = [1.0, 2.0]  # two values where three are needed
        del ds.ImageOrientationPatient

    written = write_ct_series(tmp_path, n_slices=1, edit=edit)
    header = read_header(written.paths[0], root=tmp_path)
    assert header is not None
    assert header.pixel_spacing_mm is not None and all(np.isnan(header.pixel_spacing_mm))
    assert header.image_position_mm is not None and all(np.isnan(header.image_position_mm))
    assert header.image_orientation is None


def test_file_without_preamble_is_read_when_it_has_the_uids(tmp_path: Path) -> None:
    written = write_ct_series(tmp_path, n_slices=2, preamble=False)
    assert written.paths[0].read_bytes()[128:132] != b"DICM"
    scan = scan_study(tmp_path, max_files=100)
    assert len(scan.headers) == 2 and all(h.forced for h in scan.headers)
    ds = read_dataset(scan.headers[0].path, forced=True)
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"  # implicit VR, detected
    assert ds.pixel_array.shape == (32, 32)


def test_raw_looking_garbage_is_not_dicom(tmp_path: Path) -> None:
    # Starts like a raw data set (group 0x0008) but is noise: force=True would "read" it.
    (tmp_path / "fake").write_bytes(b"\x08\x00\x16\x00" + np.random.default_rng(1).bytes(3000))
    raw_without_uids = Dataset()
    raw_without_uids.PatientName = "X"
    raw_without_uids.Modality = "CT"
    raw_without_uids.save_as(tmp_path / "nouids", implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert (tmp_path / "nouids").read_bytes()[:2] == b"\x08\x00"
    err = _error(tmp_path)
    assert err.code is ErrorCode.NO_DICOM
    assert err.message == "none of the 2 files in the study folder is a DICOM image"


def test_empty_folder_and_missing_folder(tmp_path: Path) -> None:
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    err = _error(tmp_path)
    assert err.code is ErrorCode.EMPTY_STUDY
    assert err.message == "the study folder is empty: no files to read"
    assert _error(tmp_path / "absent").code is ErrorCode.EMPTY_STUDY


def test_only_text_files_named_dcm_is_no_dicom(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"IM{i}.dcm").write_text("This is not a DICOM file.\n" * 20)
    err = _error(tmp_path)
    assert err.code is ErrorCode.NO_DICOM
    assert "none of the 3 files" in err.message


def test_too_many_files_is_refused_before_reading_any(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_ct_series(tmp_path, n_slices=4)

    def must_not_read(path: Path, *, root: Path) -> None:
        raise AssertionError("a header was read before the file count was checked")

    monkeypatch.setattr(dicom_files, "read_header", must_not_read)
    err = _error(tmp_path, max_files=3)
    assert err.code is ErrorCode.TOO_MANY_FILES
    assert "more than 3 files" in err.message


def test_symlinks_out_of_the_study_are_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    other = write_ct_series(outside, n_slices=2, nested=False)
    study = tmp_path / "study"
    inside = write_ct_series(study, n_slices=3, nested=False)
    (study / "link-to-file").symlink_to(other.paths[0])
    (study / "link-to-dir").symlink_to(outside, target_is_directory=True)
    (study / "dangling").symlink_to(tmp_path / "nowhere")
    (study / "inside-link").symlink_to(inside.paths[0])
    (study / "dangling-inside").symlink_to(study / "nowhere")

    files, warnings = list_study_files(study, max_files=100)
    names = sorted(p.name for p in files)
    assert names == sorted([*(p.name for p in inside.paths), "inside-link"])
    expected_warnings = [
        "ignored 2 symbolic link(s) pointing outside the study folder",
        "did not enter 1 symbolically linked folder(s)",
    ]
    assert warnings == expected_warnings
    scan = scan_study(study, max_files=100)
    assert {h.series_instance_uid for h in scan.headers} == {inside.series_instance_uid}
    assert list(scan.warnings) == expected_warnings


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_fifo_is_skipped_without_blocking(tmp_path: Path) -> None:
    write_ct_series(tmp_path, n_slices=2, nested=False)
    os.mkfifo(tmp_path / "pipe")
    started = time.monotonic()
    scan = scan_study(tmp_path, max_files=100)
    assert time.monotonic() - started < 5
    assert scan.n_files == 2 and len(scan.headers) == 2


def test_file_without_pixel_data_is_flagged(tmp_path: Path) -> None:
    written = write_ct_series(tmp_path, n_slices=1, nested=False)
    ds = pydicom.dcmread(written.paths[0])
    del ds.PixelData
    ds.save_as(written.paths[0], enforce_file_format=True)
    header = read_header(written.paths[0], root=tmp_path)
    assert header is not None and header.has_pixel_data is False


def test_group_by_series_keeps_order_of_first_appearance(tmp_path: Path) -> None:
    a = write_ct_series(tmp_path / "a", n_slices=2)
    b = write_ct_series(tmp_path / "b", n_slices=3)
    scan = scan_study(tmp_path, max_files=100)
    groups = group_by_series(scan.headers)
    assert list(groups) == [a.series_instance_uid, b.series_instance_uid]
    assert [len(g) for g in groups.values()] == [2, 3]


def test_read_dataset_of_a_vanished_file_is_study_changed(tmp_path: Path) -> None:
    with pytest.raises(StudyError) as info:
        read_dataset(tmp_path / "gone.dcm", forced=False)
    assert info.value.code is ErrorCode.STUDY_CHANGED


def test_time_limit_while_reading_headers_is_not_swallowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Celery soft time limit raised inside pydicom must not turn the file into "not DICOM"."""

    class SoftTimeLimitExceeded(Exception):
        pass

    written = write_ct_series(tmp_path, n_slices=1, nested=False)

    def interrupted(*args: object, **kwargs: object) -> Dataset:
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(dicom_files.pydicom, "dcmread", interrupted)
    with pytest.raises(SoftTimeLimitExceeded):
        read_header(written.paths[0], root=tmp_path)
    with pytest.raises(SoftTimeLimitExceeded):
        read_dataset(written.paths[0], forced=False)


def test_must_propagate() -> None:
    class SoftTimeLimitExceeded(Exception):
        pass

    class Sub(SoftTimeLimitExceeded):
        pass

    assert dicom_files.must_propagate(Sub())
    assert dicom_files.must_propagate(KeyboardInterrupt())
    assert not dicom_files.must_propagate(ValueError("bad DS"))
    assert not dicom_files.must_propagate(MemoryError())


def test_invalid_source_uids_are_named() -> None:
    from pydicom.dataset import Dataset

    from worker.imaging.dicom_files import invalid_uid_warning, invalid_uids, is_valid_uid, quiet_pydicom

    assert is_valid_uid("1.2.840.10008.5.1.4.1.1.2") and is_valid_uid("0.1")
    assert not is_valid_uid("1.2.840.ABC.7") and not is_valid_uid("1.3.12.05.1") and not is_valid_uid("1..2")
    assert not is_valid_uid("1." + "2" * 64)
    ds = Dataset()
    with quiet_pydicom():
        ds.StudyInstanceUID = "1.2.840.ABC.7"
        ds.SeriesInstanceUID = "1.2.3"
        ds.SOPInstanceUID = "1.2.3.04"
        found = invalid_uids(ds)
    assert found == {"StudyInstanceUID": "1.2.840.ABC.7", "SOPInstanceUID": "1.2.3.04"}
    text = invalid_uid_warning({k: [v] for k, v in found.items()}, n_images=6)
    assert text is not None
    assert "StudyInstanceUID 1.2.840.ABC.7" in text and "SOPInstanceUID of 1 of 6 images (e.g. 1.2.3.04)" in text
    assert invalid_uid_warning({}, n_images=6) is None
