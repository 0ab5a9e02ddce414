"""load_study end to end on synthetic and real studies, and every unusable input with its code."""

from __future__ import annotations

import shutil
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID, JPEG2000Lossless, RLELossless

from tests.helpers.dicom_builders import (
    positions_along_normal,
    set_unchecked,
    tilted_orientation,
    write_ct_series,
    write_mr_series,
    write_scout,
    write_secondary_capture,
)
from worker.core.ct import CtSeries
from worker.core.errors import ErrorCode, StudyError
from worker.imaging.dicom_load import load_study, read_source_headers
from worker.imaging.series_selection import SelectionRules

RULES = SelectionRules()


def _fail(study: Path, rules: SelectionRules = RULES) -> StudyError:
    with pytest.raises(StudyError) as info:
        load_study(study, rules=rules)
    message = info.value.message
    assert message and "\n" not in message and "Traceback" not in message
    return info.value


def test_full_export_selects_the_thick_axial_series(tmp_path: Path) -> None:
    study_uid = "1.2.826.0.1.3680043.8.498.1"
    write_scout(tmp_path / "S1", study_instance_uid=study_uid)
    write_secondary_capture(tmp_path / "S9", study_instance_uid=study_uid)
    write_mr_series(tmp_path / "S8", study_instance_uid=study_uid)
    thin = write_ct_series(
        tmp_path / "S3",
        n_slices=20,
        slice_gap_mm=1.0,
        slice_thickness_mm=1.0,
        series_number=3,
        series_description="HEAD 1MM",
        study_instance_uid=study_uid,
    )
    thick = write_ct_series(tmp_path / "S2", n_slices=7, study_instance_uid=study_uid)
    (tmp_path / "DICOMDIR.txt").write_text("index")

    series = load_study(tmp_path, rules=RULES)

    assert isinstance(series, CtSeries)
    assert series.series_instance_uid == thick.series_instance_uid
    assert series.hu.dtype == np.float32 and series.hu.shape == (7, 32, 32)
    np.testing.assert_array_equal(series.hu, thick.expected_hu)
    assert [s.sop_instance_uid for s in series.slices] == list(thick.sop_instance_uids)
    assert [s.path for s in series.slices] == [p.resolve() for p in thick.paths]
    np.testing.assert_allclose(series.positions_mm, thick.positions_mm)
    np.testing.assert_allclose(series.slab_thickness_mm, 5.0)
    assert series.pixel_spacing_mm == (0.5, 0.5)
    assert series.row_cosine == (1.0, 0.0, 0.0) and series.column_cosine == (0.0, 1.0, 0.0)
    assert series.slice_thickness_mm == 5.0
    assert series.series_description == "HEAD 5MM"
    assert series.warnings == []

    assert series.selection.chosen is not None
    assert series.selection.chosen.series_instance_uid == thick.series_instance_uid
    reasons = {r.series.series_number: (r.code, r.reason) for r in series.selection.rejected}
    assert reasons[1] == ("only_localizers", "localizer (ImageType contains LOCALIZER)")
    assert reasons[401] == ("only_derived", "secondary capture (SOP class Secondary Capture Image Storage)")
    assert reasons[5] == ("no_ct_series", "modality MR, not CT")
    assert reasons[3][0] == "not_preferred"
    assert thin.series_instance_uid in {r.series.series_instance_uid for r in series.selection.rejected}

    study = series.study
    assert study.study_instance_uid == study_uid
    assert study.patient_id == "PHANTOM-1"
    assert study.issuer_of_patient_id == "HOSP"
    assert study.accession_number == "ACC-42"
    assert (study.study_date, study.study_time) == ("20240102", "101010")
    assert study.acquisition_datetime == "20240102101500"
    assert study.patient_name == "Doe^Jane"


def test_shuffled_names_and_instance_numbers_are_sorted_by_position(tmp_path: Path) -> None:
    # Positions given in a scrambled order; file names and InstanceNumbers shuffled too.
    ipp = positions_along_normal([20.0, 0.0, 15.0, 5.0, 10.0, 25.0])
    written = write_ct_series(tmp_path, image_positions_mm=ipp, shuffle_seed=7)
    series = load_study(tmp_path, rules=RULES)
    np.testing.assert_allclose(series.positions_mm, [0.0 + 10, 5 + 10, 10 + 10, 15 + 10, 20 + 10, 25 + 10])
    np.testing.assert_array_equal(series.hu, written.expected_hu)
    numbers = [s.instance_number for s in series.slices]
    assert sorted(numbers) == list(range(1, 7)) and numbers != sorted(numbers)


def test_tilted_series_with_uneven_gaps(tmp_path: Path) -> None:
    """Like the real GE head: 18.5 deg tilt, table moving along z, gaps changing mid-series."""
    orientation = tilted_orientation(18.5)
    offsets = [0.0, 4.0, 8.0, 9.08, 16.07, 23.06]  # along the normal
    ipp = positions_along_normal(offsets, orientation=orientation, shear_axis=(0.0, 0.0, 1.0))
    written = write_ct_series(tmp_path, image_positions_mm=ipp, orientation=orientation)
    series = load_study(tmp_path, rules=RULES)
    gaps = np.diff(offsets)
    expected_slabs = np.concatenate([[gaps[0]], (gaps[:-1] + gaps[1:]) / 2, [gaps[-1]]])
    np.testing.assert_allclose(series.slab_thickness_mm, expected_slabs, atol=1e-5)
    np.testing.assert_allclose(np.diff(series.positions_mm), gaps, atol=1e-5)
    assert [s.sop_instance_uid for s in series.slices] == list(written.sop_instance_uids)
    assert any("uneven slice gaps" in w and "NIfTI affine uses the mean step" in w for w in series.warnings)


def test_duplicate_slices_are_dropped_with_a_warning(tmp_path: Path) -> None:
    ipp = positions_along_normal([0.0, 5.0, 10.0, 10.0, 15.0, 20.0, 25.0])
    write_ct_series(tmp_path, image_positions_mm=ipp)
    series = load_study(tmp_path, rules=RULES)
    assert series.n_slices == 6
    assert len({s.position_mm for s in series.slices}) == 6
    assert any(w.startswith("dropped 1 image(s) at duplicate positions") for w in series.warnings)


def test_raw_files_without_preamble_load(tmp_path: Path) -> None:
    written = write_ct_series(tmp_path, preamble=False)
    series = load_study(tmp_path, rules=RULES)
    np.testing.assert_array_equal(series.hu, written.expected_hu)


def test_read_source_headers_in_sorted_order_without_pixels(tmp_path: Path) -> None:
    written = write_ct_series(tmp_path, n_slices=5)
    series = load_study(tmp_path, rules=RULES)
    headers = read_source_headers(series)
    assert all(isinstance(h, pydicom.Dataset) for h in headers)
    assert [h.SOPInstanceUID for h in headers] == list(written.sop_instance_uids)
    assert all("PixelData" not in h for h in headers)
    assert headers[0].PatientID == "PHANTOM-1"
    # kept from the load (no second read), and the same when read again from the files
    assert series.source_headers is not None and headers[0] is series.source_headers[0]
    series.source_headers = None
    again = read_source_headers(series)
    assert [h.SOPInstanceUID for h in again] == list(written.sop_instance_uids)
    assert all("PixelData" not in h for h in again)


def test_single_compressed_real_slice_falls_back_to_slice_thickness(tmp_path: Path) -> None:
    """pydicom-data's head CT slice, as JPEG 2000 lossless and uncompressed, with min_slices=1."""
    names = ("693_UNCR.dcm", "693_J2KR.dcm")
    paths = [get_testdata_file(name) for name in names]
    if any(p is None for p in paths):
        pytest.skip("pydicom-data is not installed: 693_UNCR.dcm / 693_J2KR.dcm missing")
    loaded = []
    for name, path in zip(names, paths, strict=True):
        study = tmp_path / name
        study.mkdir()
        shutil.copy(str(path), study / "slice")
        loaded.append(load_study(study, rules=SelectionRules(min_slices=1)))
    uncompressed, j2k = loaded
    np.testing.assert_array_equal(j2k.hu, uncompressed.hu)
    nominal = float(pydicom.dcmread(paths[0], stop_before_pixels=True).SliceThickness)
    assert uncompressed.slab_thickness_mm.tolist() == [nominal]
    assert any("single slice" in w and "SliceThickness" in w for w in uncompressed.warnings)


# --- unusable input: every code, with its message -----------------------------------------


def test_empty_folder(tmp_path: Path) -> None:
    err = _fail(tmp_path)
    assert err.code is ErrorCode.EMPTY_STUDY


def test_text_files_named_dcm(tmp_path: Path) -> None:
    for i in range(4):
        (tmp_path / f"{i}.dcm").write_text("hello\n")
    err = _fail(tmp_path)
    assert err.code is ErrorCode.NO_DICOM
    assert err.message == "none of the 4 files in the study folder is a DICOM image"


def test_mr_only(tmp_path: Path) -> None:
    write_mr_series(tmp_path)
    err = _fail(tmp_path)
    assert err.code is ErrorCode.NO_CT_SERIES
    assert "modality MR, not CT" in err.message


def test_only_scouts(tmp_path: Path) -> None:
    write_scout(tmp_path / "a")
    write_scout(tmp_path / "b", n_images=2)
    err = _fail(tmp_path)
    assert err.code is ErrorCode.ONLY_LOCALIZERS
    assert err.message.startswith("only localizer (scout) images in the study")


def test_only_secondary_captures(tmp_path: Path) -> None:
    write_secondary_capture(tmp_path / "a")
    write_secondary_capture(tmp_path / "b", sop_class=False)  # DERIVED\SECONDARY with the CT SOP class
    err = _fail(tmp_path)
    assert err.code is ErrorCode.ONLY_DERIVED
    assert "secondary capture" in err.message and "ImageType DERIVED\\SECONDARY" in err.message


def test_single_slice(tmp_path: Path) -> None:
    write_ct_series(tmp_path, n_slices=1)
    err = _fail(tmp_path)
    assert err.code is ErrorCode.TOO_FEW_SLICES
    assert "1 slice, at least 5 needed" in err.message


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"Rows": 16, "Columns": 16}, "slices differ in rows x columns (16x16, 32x32)"),
        ({"PixelSpacing": ["0.7", "0.7"]}, "slices differ in PixelSpacing (0.5\\0.5 to 0.7\\0.7 mm)"),
    ],
)
def test_inconsistent_geometry(tmp_path: Path, change: dict[str, object], reason: str) -> None:
    def edit(ds: Dataset, i: int) -> None:
        if i == 3:
            for keyword, value in change.items():
                setattr(ds, keyword, value)
            if "Rows" in change:
                ds.PixelData = ds.PixelData[: 16 * 16 * 2]

    write_ct_series(tmp_path, edit=edit)
    err = _fail(tmp_path)
    assert err.code is ErrorCode.INCONSISTENT_GEOMETRY
    assert reason in err.message


def test_missing_pixel_data(tmp_path: Path) -> None:
    def edit(ds: Dataset, i: int) -> None:
        if i == 2:
            del ds.PixelData

    write_ct_series(tmp_path, edit=edit)
    err = _fail(tmp_path)
    assert err.code is ErrorCode.MISSING_PIXEL_DATA
    assert "1 of 6 images have no pixel data" in err.message


def test_truncated_file(tmp_path: Path) -> None:
    written = write_ct_series(tmp_path)
    victim = written.paths[4]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 700])  # cut inside the pixel data
    err = _fail(tmp_path)
    assert err.code is ErrorCode.TRUNCATED_FILE
    assert err.message.startswith(f"{victim.relative_to(tmp_path)} is truncated:")


def test_unsupported_compression(tmp_path: Path) -> None:
    def edit(ds: Dataset, i: int) -> None:
        ds.file_meta.TransferSyntaxUID = UID("1.2.826.0.1.3680043.99.1.1")  # a private, unknown syntax
        ds.PixelData = encapsulate([b"\x00\x11" * 200])
        ds["PixelData"].VR = "OB"

    write_ct_series(tmp_path, edit=edit)
    err = _fail(tmp_path)
    assert err.code is ErrorCode.UNSUPPORTED_COMPRESSION
    assert "1.2.826.0.1.3680043.99.1.1 is not supported" in err.message


def test_corrupt_compressed_pixel_data(tmp_path: Path) -> None:
    def edit(ds: Dataset, i: int) -> None:
        if i == 1:
            ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
            ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(300)])
            ds["PixelData"].VR = "OB"

    write_ct_series(tmp_path, edit=edit)
    assert _fail(tmp_path).code is ErrorCode.CORRUPT_PIXEL_DATA


def test_absurd_declared_size_is_refused_without_allocating(tmp_path: Path) -> None:
    def edit(ds: Dataset, i: int) -> None:
        ds.Rows = 65535
        ds.Columns = 65535  # 16 GiB of float32 per slice if anyone believed it

    write_ct_series(tmp_path, edit=edit)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        err = _fail(tmp_path)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err.code is ErrorCode.TOO_LARGE
    assert "65535x65535 pixels per slice, at most 4194304 accepted" in err.message
    assert peak < 20 * 2**20, f"peak allocation {peak / 2**20:.1f} MiB"
    assert elapsed < 2.0


def test_more_slices_than_allowed(tmp_path: Path) -> None:
    write_ct_series(tmp_path, n_slices=8)
    err = _fail(tmp_path, SelectionRules(max_slices=7))
    assert err.code is ErrorCode.TOO_LARGE
    assert "8 slices, at most 7 accepted" in err.message


def test_too_many_files(tmp_path: Path) -> None:
    write_ct_series(tmp_path, n_slices=6)
    assert _fail(tmp_path, SelectionRules(max_files=5)).code is ErrorCode.TOO_MANY_FILES


@pytest.mark.parametrize(
    ("spacing", "shown"), [(["nan", "nan"], "nan\\nan"), (["0", "0"], "0\\0"), (["inf", "0.5"], "inf\\0.5")]
)
def test_invalid_pixel_spacing(tmp_path: Path, spacing: list[str], shown: str) -> None:
    write_ct_series(tmp_path, edit=lambda ds, i: set_unchecked(ds, "PixelSpacing", spacing))
    err = _fail(tmp_path)
    assert err.code is ErrorCode.INVALID_GEOMETRY
    assert f"PixelSpacing {shown} is not two positive numbers (mm)" in err.message


def test_missing_image_position(tmp_path: Path) -> None:
    def edit(ds: Dataset, i: int) -> None:
        del ds.ImagePositionPatient

    write_ct_series(tmp_path, edit=edit)
    err = _fail(tmp_path)
    assert err.code is ErrorCode.MISSING_GEOMETRY
    assert "ImagePositionPatient missing on 6 of 6 images" in err.message


def test_multiframe_is_refused(tmp_path: Path) -> None:
    write_ct_series(tmp_path, edit=lambda ds, i: setattr(ds, "NumberOfFrames", 3))
    err = _fail(tmp_path)
    assert err.code is ErrorCode.MULTIFRAME_UNSUPPORTED
    assert "export the series as single-frame CT images" in err.message


def test_file_rewritten_after_the_scan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file replaced between header scan and pixel read by one of another size is caught."""
    written = write_ct_series(tmp_path)
    import worker.imaging.dicom_load as dicom_load

    real_read = dicom_load.read_dataset

    def swap_then_read(path: Path, **kwargs: object) -> Dataset:
        ds = real_read(path, **kwargs)  # type: ignore[arg-type]
        if path == written.paths[2].resolve():
            ds.Rows = ds.Columns = 16
            ds.PixelData = ds.PixelData[: 16 * 16 * 2]
        return ds

    monkeypatch.setattr(dicom_load, "read_dataset", swap_then_read)
    err = _fail(tmp_path)
    assert err.code is ErrorCode.INCONSISTENT_GEOMETRY


# --- real data ---------------------------------------------------------------------------


@pytest.mark.realdata
def test_real_ge_head_with_gantry_tilt(real_ge_ct: Path) -> None:
    series = load_study(real_ge_ct, rules=RULES)
    assert series.hu.shape == (28, 512, 512)
    assert series.selection.rejected == ()
    files = sorted(real_ge_ct.glob("*.dcm"))
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    normal = series.normal
    assert np.degrees(np.arccos(normal[2])) == pytest.approx(18.5, abs=0.05)
    by_position = sorted(headers, key=lambda h: float(np.dot(np.array(h.ImagePositionPatient, float), normal)))
    assert [s.sop_instance_uid for s in series.slices] == [h.SOPInstanceUID for h in by_position]
    gaps = np.diff(series.positions_mm)
    assert gaps.min() == pytest.approx(1.08, abs=0.01) and gaps.max() == pytest.approx(6.99, abs=0.01)
    expected = np.concatenate([[gaps[0]], (gaps[:-1] + gaps[1:]) / 2, [gaps[-1]]])
    np.testing.assert_allclose(series.slab_thickness_mm, expected)
    assert any("uneven slice gaps" in w for w in series.warnings)
    # Padding (-1500 stored) became air; the brain window holds tissue.
    first = pydicom.dcmread(series.slices[0].path)
    assert np.all(series.hu[0][first.pixel_array == -1500] == -1024.0)
    assert series.hu.min() == -1024.0
    assert 0 < np.median(series.hu[14][series.hu[14] > -500]) < 100


@pytest.mark.realdata
def test_real_philips_selection(philips_study: Path) -> None:
    series = load_study(philips_study, rules=RULES)
    assert series.series_description == "STD BRAIN 5MM"
    assert series.hu.shape == (28, 512, 512)
    assert series.selection.chosen is not None and series.selection.chosen.series_number == 201
    rejected = {r.series.series_number: r for r in series.selection.rejected}
    assert set(rejected) == {100, 401}
    assert (rejected[100].code, rejected[100].reason) == (
        "only_localizers",
        "localizer (ImageType contains LOCALIZER)",
    )
    assert rejected[401].code == "only_derived"
    assert rejected[401].series.series_description == "Exam Summary"
    np.testing.assert_allclose(series.slab_thickness_mm, 5.0)
    assert series.pixel_spacing_mm == pytest.approx((0.451171875, 0.451171875))
    # Unsigned 12-bit, intercept -1024: air outside reads about -1000 HU, not 0.
    assert series.hu[14, 5, 5] < -900
    assert series.study.patient_id == "PLASTIC"


@pytest.mark.realdata
def test_real_philips_without_the_axial_series(philips_study: Path, tmp_path: Path) -> None:
    for name in ("S1000", "S4010"):
        shutil.copytree(philips_study / name, tmp_path / name)
    err = _fail(tmp_path)
    assert err.code is ErrorCode.NO_USABLE_SERIES
    assert "localizer (ImageType contains LOCALIZER)" in err.message and "'Exam Summary'" in err.message


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=lambda s: UID(s).name)
def test_truncated_compressed_file(tmp_path: Path, syntax: str) -> None:
    written = write_ct_series(tmp_path, transfer_syntax=syntax, rows=64, columns=64)
    victim = written.paths[2]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 300])
    err = _fail(tmp_path)
    assert err.code is ErrorCode.TRUNCATED_FILE
    assert err.message == f"{victim.relative_to(tmp_path)} is truncated: the file ends inside its pixel data"
