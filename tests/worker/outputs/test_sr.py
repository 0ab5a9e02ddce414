"""The TID 1500 volume report and the overlay secondary capture, built from real pipeline output."""

from __future__ import annotations

import copy
from pathlib import Path

import cv2
import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage, SecondaryCaptureImageStorage

from tests.helpers.dciodvfy import dciodvfy
from tests.helpers.pacs_results import BLOOD_VOLUME_ML, MeasuredStudy, measured_study
from worker.core.notices import DISCLAIMER
from worker.outputs.secondary_capture import OVERLAY_SERIES_DESCRIPTION, build_overlay_sc, read_png_rgb
from worker.outputs.sr import (
    SR_SERIES_DESCRIPTION,
    PredecessorSr,
    VolumeReport,
    build_volume_sr,
    derived_uid,
    read_volume_report,
)


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> MeasuredStudy:
    return measured_study(tmp_path_factory.mktemp("measured"))


def report_for(measured: MeasuredStudy, **changes: object) -> VolumeReport:
    r = measured.outcome.result
    values: dict[str, object] = {
        "volume_ml": float(r["volume_ml"]),
        "abc2_ml": 0.3125,  # not the volume, so a swapped field would show
        "n_slices": int(r["n_slices"]),
        "pixel_spacing_mm": (0.5, 0.45),
        "slab_thickness_mean_mm": 4.75,
        "series_instance_uid": str(r["series_instance_uid"]),
        "model_name": "DR-UNet",
        "model_version": "2024.2",
        "model_sha256": "ab" * 32,
    }
    values.update(changes)
    return VolumeReport(**values)  # type: ignore[arg-type]


def saved_and_read(ds: pydicom.Dataset, path: Path) -> pydicom.Dataset:
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


def test_the_sr_round_trips_every_number(measured: MeasuredStudy, tmp_path: Path) -> None:
    seg = pydicom.dcmread(measured.seg_path)
    report = report_for(measured)
    back = saved_and_read(build_volume_sr(seg=seg, report=report), tmp_path / "sr.dcm")
    numbers = read_volume_report(back)
    assert numbers["volume_ml"] == pytest.approx(BLOOD_VOLUME_ML) == report.volume_ml
    assert numbers["abc2_ml"] == 0.3125
    assert numbers["n_slices"] == 6
    assert (numbers["pixel_spacing_row_mm"], numbers["pixel_spacing_col_mm"]) == (0.5, 0.45)
    assert numbers["slab_thickness_mean_mm"] == 4.75
    assert numbers["segmentation_sop_instance_uid"] == seg.SOPInstanceUID
    assert numbers["source_series_instance_uid"] == measured.written.series_instance_uid
    assert (numbers["algorithm_name"], numbers["algorithm_version"]) == ("DR-UNet", "2024.2")


def test_the_sr_is_a_tid1500_report_highdicom_can_read(measured: MeasuredStudy, tmp_path: Path) -> None:
    seg = pydicom.dcmread(measured.seg_path)
    build_volume_sr(seg=seg, report=report_for(measured)).save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    sr = hd.sr.srread(tmp_path / "sr.dcm")
    assert sr.SOPClassUID == Comprehensive3DSRStorage and sr.Modality == "SR"
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert sr.SeriesDescription == SR_SERIES_DESCRIPTION and "research use only" in sr.SeriesDescription
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == ("COMPLETE", "UNVERIFIED", "PRELIMINARY")
    # patient and study are the CT's (through the SEG): the report files into the right study
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "StudyDate", "AccessionNumber"):
        assert sr.get(keyword) == seg.get(keyword), keyword
    assert sr.PatientID == "PACS-1"
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 1
    group = groups[0]
    assert group.finding_type == codes.SCT.Hematoma
    assert group.reference_type == codes.DCM.ReferencedSegment
    volume = group.get_measurements(name=codes.SCT.Volume)
    assert len(volume) == 1 and volume[0].value == pytest.approx(BLOOD_VOLUME_ML)
    assert volume[0].unit.value == "ml" and volume[0].unit.scheme_designator == "UCUM"
    assert volume[0].method.value == "126030"  # Sum of segmented voxel method for volume
    abc2 = group.get_measurements(name=codes.DCM.VolumeOfEllipsoid)
    assert len(abc2) == 1 and abc2[0].value == 0.3125 and abc2[0].method.value == "126029"  # LWH (ABC/2)
    # the SEG and every measured CT instance are listed as evidence
    evidence = {
        ref.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert evidence == {seg.SOPInstanceUID, *measured.written.sop_instance_uids}


def test_the_sr_says_research_use_only(measured: MeasuredStudy) -> None:
    sr = build_volume_sr(seg=pydicom.dcmread(measured.seg_path), report=report_for(measured))
    texts = [item.TextValue for item in _walk(sr) if item.get("ValueType") == "TEXT"]
    assert any(DISCLAIMER in text and "ABC/2" in text for text in texts), texts


def _walk(ds: pydicom.Dataset) -> list[pydicom.Dataset]:
    items = []
    for item in ds.get("ContentSequence", []):
        items.append(item)
        items.extend(_walk(item))
    return items


def test_uids_are_stable_per_seg_so_a_resend_replaces(measured: MeasuredStudy, tmp_path: Path) -> None:
    seg = pydicom.dcmread(measured.seg_path)
    first = build_volume_sr(seg=seg, report=report_for(measured))
    second = build_volume_sr(seg=seg, report=report_for(measured))
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (second.SOPInstanceUID, second.SeriesInstanceUID)
    other_seg = copy.deepcopy(seg)
    other_seg.SOPInstanceUID = pydicom.uid.generate_uid()
    third = build_volume_sr(seg=other_seg, report=report_for(measured))
    assert third.SOPInstanceUID != first.SOPInstanceUID
    assert first.SOPInstanceUID.startswith("2.25.") and len(first.SOPInstanceUID) <= 64
    assert pydicom.uid.UID(first.SOPInstanceUID).is_valid
    assert derived_uid("a", "b") == derived_uid("a", "b") != derived_uid("ab")


def test_the_abc2_lengths_are_measurements_of_the_group(measured: MeasuredStudy, tmp_path: Path) -> None:
    """A, B and C (mm) beside the ABC/2 volume they make: A x B x C / 2 mm^3 = the volume of ellipsoid."""
    a, b, c = 12.5, 8.0, 7.5
    report = report_for(measured, abc2_ml=a * b * c / 2 / 1000, abc2_a_mm=a, abc2_b_mm=b, abc2_c_mm=c)
    build_volume_sr(seg=pydicom.dcmread(measured.seg_path), report=report).save_as(tmp_path / "sr.dcm")
    sr = hd.sr.srread(tmp_path / "sr.dcm")
    (group,) = sr.content.get_volumetric_roi_measurement_groups()
    for concept, value in ((codes.SCT.Length, a), (codes.SCT.Width, b), (codes.DCM.Height, c)):
        (measurement,) = group.get_measurements(name=concept)
        assert measurement.value == value and measurement.unit.value == "mm", concept
    numbers = read_volume_report(pydicom.dcmread(tmp_path / "sr.dcm"))
    assert (numbers["abc2_a_mm"], numbers["abc2_b_mm"], numbers["abc2_c_mm"]) == (a, b, c)
    assert numbers["abc2_ml"] == pytest.approx(a * b * c / 2 / 1000)
    # a result recorded before the lengths were kept: the SR leaves them out
    older = read_volume_report(build_volume_sr(seg=pydicom.dcmread(measured.seg_path), report=report_for(measured)))
    assert "abc2_a_mm" not in older


def test_a_new_measurement_names_the_sr_it_replaces_and_both_validate(measured: MeasuredStudy, tmp_path: Path) -> None:
    """The study measured again (another model version): the new SR names the first in its Predecessor
    Documents Sequence; dciodvfy finds no error in either."""
    seg = pydicom.dcmread(measured.seg_path)
    lengths = {"abc2_a_mm": 5.0, "abc2_b_mm": 5.0, "abc2_c_mm": 10.0}
    first = build_volume_sr(seg=seg, report=report_for(measured, model_version="1", **lengths))
    first.save_as(tmp_path / "first.dcm", enforce_file_format=True)
    remeasured = copy.deepcopy(seg)  # the new model's SEG: a new instance
    remeasured.SOPInstanceUID = derived_uid("test", "second seg")
    replaces = PredecessorSr(
        study_instance_uid=first.StudyInstanceUID,
        series_instance_uid=first.SeriesInstanceUID,
        sop_instance_uid=first.SOPInstanceUID,
    )
    report = report_for(measured, model_version="2", **lengths)
    second = build_volume_sr(seg=remeasured, report=report, replaces=replaces)
    second.save_as(tmp_path / "second.dcm", enforce_file_format=True)
    back = pydicom.dcmread(tmp_path / "second.dcm")
    (study,) = back.PredecessorDocumentsSequence
    (series,) = study.ReferencedSeriesSequence
    (instance,) = series.ReferencedSOPSequence
    assert (study.StudyInstanceUID, series.SeriesInstanceUID) == (first.StudyInstanceUID, first.SeriesInstanceUID)
    assert (instance.ReferencedSOPClassUID, instance.ReferencedSOPInstanceUID) == (
        Comprehensive3DSRStorage,
        first.SOPInstanceUID,
    )
    assert read_volume_report(back)["replaces_sop_instance_uid"] == first.SOPInstanceUID
    assert "replaces_sop_instance_uid" not in read_volume_report(pydicom.dcmread(tmp_path / "first.dcm"))
    assert second.SeriesInstanceUID != first.SeriesInstanceUID  # a new report, the old one left as sent
    for name in ("first.dcm", "second.dcm"):
        verdict = dciodvfy(tmp_path / name)
        assert verdict.errors == (), f"{name}:\n{verdict.text}"
    with pytest.raises(ValueError, match="cannot replace itself"):
        build_volume_sr(
            seg=seg,
            report=report_for(measured),
            replaces=PredecessorSr(first.StudyInstanceUID, first.SeriesInstanceUID, first.SOPInstanceUID),
        )


def test_a_report_for_another_series_is_refused(measured: MeasuredStudy) -> None:
    seg = pydicom.dcmread(measured.seg_path)
    with pytest.raises(ValueError, match="references series"):
        build_volume_sr(seg=seg, report=report_for(measured, series_instance_uid="1.2.3"))


@pytest.mark.parametrize(("field", "value"), [("volume_ml", -1.0), ("abc2_ml", float("nan")), ("n_slices", 0)])
def test_impossible_numbers_are_refused(measured: MeasuredStudy, field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        build_volume_sr(seg=pydicom.dcmread(measured.seg_path), report=report_for(measured, **{field: value}))


def test_reading_an_sr_with_a_wrong_unit_fails(measured: MeasuredStudy, tmp_path: Path) -> None:
    built = build_volume_sr(seg=pydicom.dcmread(measured.seg_path), report=report_for(measured))
    sr = saved_and_read(built, tmp_path / "sr.dcm")
    changed = 0
    for item in _walk(sr):
        if item.get("ValueType") == "NUM" and item.ConceptNameCodeSequence[0].CodeValue == "118565006":
            item.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue = "cm3"
            changed += 1
    assert changed == 1
    with pytest.raises(ValueError, match="'Volume' is in 'cm3'"):
        read_volume_report(sr)


def test_the_overlay_becomes_an_rgb_secondary_capture(measured: MeasuredStudy, tmp_path: Path) -> None:
    seg = pydicom.dcmread(measured.seg_path)
    rgb = read_png_rgb(measured.overlay_path)
    back = saved_and_read(build_overlay_sc(seg=seg, rgb=rgb), tmp_path / "sc.dcm")
    assert back.SOPClassUID == SecondaryCaptureImageStorage
    assert (back.PhotometricInterpretation, back.SamplesPerPixel, back.BitsAllocated) == ("RGB", 3, 8)
    assert back.BurnedInAnnotation == "YES" and back.SeriesDescription == OVERLAY_SERIES_DESCRIPTION
    assert back.StudyInstanceUID == seg.StudyInstanceUID and back.PatientID == seg.PatientID
    assert list(back.PatientOrientation) == ["L", "P"]  # axial CT: rows to the left, columns posterior
    pixels = back.pixel_array
    assert pixels.shape == rgb.shape and np.array_equal(pixels, rgb)
    # the outline is pure red in the PNG (BGR 0,0,255): red must be channel 0 in the SC
    bgr = cv2.imread(str(measured.overlay_path), cv2.IMREAD_COLOR)
    red = (bgr[..., 2] == 255) & (bgr[..., 1] == 0) & (bgr[..., 0] == 0)
    assert red.any() and np.all(pixels[red] == [255, 0, 0])


def test_the_overlay_orientation_follows_the_slices(measured: MeasuredStudy) -> None:
    seg = pydicom.dcmread(measured.seg_path)
    plane = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
    plane.ImageOrientationPatient = [-1, 0, 0, 0, 0, -1]  # rows to the right, columns to the feet
    sc = build_overlay_sc(seg=seg, rgb=np.zeros((8, 8, 3), np.uint8))
    assert list(sc.PatientOrientation) == ["R", "F"]


def test_the_overlay_must_be_rgb(measured: MeasuredStudy) -> None:
    with pytest.raises(ValueError, match="RGB"):
        build_overlay_sc(seg=pydicom.dcmread(measured.seg_path), rgb=np.zeros((8, 8), np.uint8))


def test_an_unreadable_png_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "overlay.png").write_bytes(b"not a picture")
    with pytest.raises(ValueError, match="not a readable image"):
        read_png_rgb(tmp_path / "overlay.png")
