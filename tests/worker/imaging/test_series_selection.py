"""Series selection rules on headers (no files): which series is measured, why others are not."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers.dicom_builders import SAGITTAL, tilted_orientation
from worker.core.errors import ErrorCode, StudyError
from worker.core.settings import Settings
from worker.imaging.dicom_files import DicomHeader
from worker.imaging.series_selection import (
    CT_IMAGE_STORAGE,
    ENHANCED_CT_STORAGE,
    SECONDARY_CAPTURE_PREFIX,
    SelectionRules,
    UsableSeries,
    evaluate_series,
    select_series,
)

_uids = itertools.count(1)
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def series(
    n: int = 6,
    *,
    gap_mm: float = 5.0,
    orientation: tuple[float, ...] = AXIAL,
    uid: str | None = None,
    number: int = 2,
    **overrides: Any,
) -> list[DicomHeader]:
    """Headers of one series: ``n`` slices ``gap_mm`` apart along the normal, shuffled InstanceNumbers."""
    uid = uid or f"1.2.3.{next(_uids)}"
    row, col = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row, col)
    instance_numbers = list(reversed(range(1, n + 1)))
    headers = []
    for i in range(n):
        position = tuple(float(v) for v in np.array([-10.0, -10.0, 40.0]) + normal * gap_mm * i)
        fields: dict[str, Any] = {
            "path": Path(f"/study/{uid}/{i}"),
            "forced": False,
            "sop_class_uid": CT_IMAGE_STORAGE,
            "sop_instance_uid": f"{uid}.{i}",
            "series_instance_uid": uid,
            "study_instance_uid": "1.2.3",
            "transfer_syntax_uid": "1.2.840.10008.1.2.1",
            "modality": "CT",
            "image_type": ("ORIGINAL", "PRIMARY", "AXIAL"),
            "rows": 64,
            "columns": 64,
            "samples_per_pixel": 1,
            "number_of_frames": None,
            "pixel_spacing_mm": (0.5, 0.5),
            "image_orientation": tuple(orientation),
            "image_position_mm": position,
            "slice_thickness_mm": gap_mm,
            "instance_number": instance_numbers[i],
            "series_number": number,
            "series_description": f"series {number}",
            "has_pixel_data": True,
        }
        fields.update(overrides)
        headers.append(DicomHeader(**fields))
    return headers


def edit(headers: list[DicomHeader], index: int, **changes: Any) -> list[DicomHeader]:
    out = list(headers)
    out[index] = dataclasses.replace(out[index], **changes)
    return out


def rejection(headers: list[DicomHeader], rules: SelectionRules | None = None) -> tuple[str, str]:
    outcome = evaluate_series(headers, rules=rules or SelectionRules())
    assert not isinstance(outcome, UsableSeries), "the series should have been rejected"
    return outcome.code, outcome.reason


def failure(headers: list[DicomHeader], rules: SelectionRules | None = None) -> StudyError:
    with pytest.raises(StudyError) as info:
        select_series(headers, rules=rules or SelectionRules())
    assert "\n" not in info.value.message
    return info.value


def test_rules_from_settings() -> None:
    settings = Settings.from_env(
        {
            "ICHVOL_SERIES_MAX_TILT_DEG": "20",
            "ICHVOL_SERIES_MIN_SLICES": "3",
            "ICHVOL_SERIES_PREFERRED_THICKNESS_MM": "2.5",
            "ICHVOL_MAX_SLICE_PIXELS": "1000",
            "ICHVOL_MAX_SLICES": "7",
            "ICHVOL_MAX_FILES": "9",
        }
    )
    assert SelectionRules.from_settings(settings) == SelectionRules(
        max_tilt_deg=20.0,
        min_slices=3,
        preferred_thickness_mm=2.5,
        max_slice_pixels=1000,
        max_slices=7,
        max_files=9,
    )
    assert SelectionRules.from_settings(Settings.from_env({})) == SelectionRules()


def test_slices_are_sorted_by_position_not_instance_number() -> None:
    headers = series(6)
    shuffled = [headers[i] for i in (3, 0, 5, 1, 4, 2)]
    outcome = select_series(shuffled, rules=SelectionRules())
    assert [h.sop_instance_uid for h in outcome.chosen.headers] == [h.sop_instance_uid for h in headers]
    np.testing.assert_allclose(np.diff(outcome.chosen.positions_mm), 5.0)
    # InstanceNumbers run backwards here: sorting by them would reverse the stack.
    assert [h.instance_number for h in outcome.chosen.headers] == [6, 5, 4, 3, 2, 1]


def test_prefers_thickness_near_5mm_then_more_slices() -> None:
    thin = series(40, gap_mm=1.0, number=3)
    thick = series(8, gap_mm=5.0, number=4)
    thick_more = series(10, gap_mm=5.0, number=5)
    outcome = select_series([*thin, *thick, *thick_more], rules=SelectionRules())
    assert outcome.chosen.summary.series_number == 5
    assert outcome.selection.chosen == outcome.chosen.summary
    rejected = {r.series.series_number: r for r in outcome.selection.rejected}
    assert set(rejected) == {3, 4}
    assert rejected[3].code == "not_preferred"
    assert rejected[3].reason.startswith("not preferred: 40 slices of 1.00 mm; chose series 5")
    # With a thin preference the thin series wins.
    thin_rules = SelectionRules(preferred_thickness_mm=1.0)
    assert select_series([*thin, *thick], rules=thin_rules).chosen.summary.series_number == 3


def test_thickness_falls_back_to_the_median_gap() -> None:
    no_tag = series(8, gap_mm=5.0, number=4, slice_thickness_mm=None)
    thin = series(8, gap_mm=1.0, number=3)
    outcome = select_series([*thin, *no_tag], rules=SelectionRules())
    assert outcome.chosen.summary.series_number == 4
    assert outcome.chosen.thickness_mm == pytest.approx(5.0)


@pytest.mark.parametrize(
    ("headers", "code", "reason"),
    [
        (series(modality="MR"), "no_ct_series", "modality MR, not CT"),
        (
            series(image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), orientation=SAGITTAL),
            "only_localizers",
            "localizer (ImageType contains LOCALIZER)",
        ),
        (
            series(sop_class_uid=SECONDARY_CAPTURE_PREFIX),
            "only_derived",
            "secondary capture (SOP class Secondary Capture Image Storage)",
        ),
        (
            series(image_type=("DERIVED", "SECONDARY", "SCREEN SAVE")),
            "only_derived",
            "derived/secondary image (ImageType DERIVED\\SECONDARY)",
        ),
        (
            series(samples_per_pixel=3),
            "only_derived",
            "colour image (3 samples per pixel): a screenshot, not CT",
        ),
        (series(3), "too_few_slices", "3 slices, at least 5 needed"),
        (series(1), "too_few_slices", "1 slice, at least 5 needed"),
        (
            series(number_of_frames=40),
            "multiframe_unsupported",
            "multi-frame (enhanced) CT, 40 frame(s) per file",
        ),
        (series(sop_class_uid=ENHANCED_CT_STORAGE), "multiframe_unsupported", "multi-frame (enhanced) CT"),
        (series(orientation=SAGITTAL), "not_axial", "not axial: slice normal 90.0 deg from patient z"),
        (series(orientation=tilted_orientation(40.0)), "not_axial", "not axial: slice normal 40.0 deg"),
        (series(image_position_mm=None), "missing_geometry", "ImagePositionPatient missing on 6 of 6 images"),
        (series(pixel_spacing_mm=None), "missing_geometry", "PixelSpacing missing on 6 of 6 images"),
        (
            series(pixel_spacing_mm=(np.nan, np.nan)),
            "invalid_geometry",
            "PixelSpacing nan\\nan is not two positive",
        ),
        (series(pixel_spacing_mm=(0.0, 0.5)), "invalid_geometry", "PixelSpacing 0\\0.5 is not two positive"),
        (
            series(pixel_spacing_mm=(-0.5, 0.5)),
            "invalid_geometry",
            "PixelSpacing -0.5\\0.5 is not two positive",
        ),
        (
            series(image_orientation=(1.0, 0.0, 0.0, 1.0, 0.0, 0.0)),
            "invalid_geometry",
            "ImageOrientationPatient is not two orthogonal",
        ),
        (
            series(rows=65535, columns=65535),
            "too_large",
            "65535x65535 pixels per slice, at most 4194304 accepted",
        ),
        (series(has_pixel_data=False), "missing_pixel_data", "6 of 6 images have no pixel data"),
    ],
)
def test_rejections_have_a_code_and_a_reason(headers: list[DicomHeader], code: str, reason: str) -> None:
    got_code, got_reason = rejection(headers)
    assert got_code == code
    assert got_reason.startswith(reason)


def test_inconsistent_rows_spacing_or_orientation() -> None:
    code, reason = rejection(edit(series(), 2, rows=32, columns=32))
    assert (code, reason) == ("inconsistent_geometry", "slices differ in rows x columns (32x32, 64x64)")
    code, reason = rejection(edit(series(), 4, pixel_spacing_mm=(0.6, 0.6)))
    assert (code, reason) == (
        "inconsistent_geometry",
        "slices differ in PixelSpacing (0.5\\0.5 to 0.6\\0.6 mm)",
    )
    code, reason = rejection(edit(series(), 1, image_orientation=tilted_orientation(5.0)))
    assert (code, reason) == ("inconsistent_geometry", "slices differ in ImageOrientationPatient")
    # One image missing its position is missing geometry, whatever the others say.
    code, reason = rejection(edit(series(), 0, image_position_mm=None))
    assert (code, reason) == ("missing_geometry", "ImagePositionPatient missing on 1 of 6 images")


def test_gantry_tilt_within_the_limit_is_axial() -> None:
    outcome = select_series(series(orientation=tilted_orientation(18.5)), rules=SelectionRules())
    assert outcome.chosen.tilt_deg == pytest.approx(18.5)
    np.testing.assert_allclose(np.diff(outcome.chosen.positions_mm), 5.0)
    strict = SelectionRules(max_tilt_deg=10.0)
    assert rejection(series(orientation=tilted_orientation(18.5)), strict)[0] == "not_axial"


def test_duplicate_positions_keep_the_lowest_instance_number() -> None:
    headers = series(6)
    duplicate = dataclasses.replace(
        headers[2],
        sop_instance_uid="9.9.9",
        instance_number=0,
        image_position_mm=tuple(v + (0.005 if i == 2 else 0.0) for i, v in enumerate(headers[2].image_position_mm)),
    )
    outcome = select_series([*headers, duplicate], rules=SelectionRules())
    kept = outcome.chosen.headers
    assert len(kept) == 6
    assert kept[2].sop_instance_uid == "9.9.9"  # InstanceNumber 0 beats the original's 4
    assert outcome.chosen.warnings == (
        "dropped 1 image(s) at duplicate positions (within 0.01 mm along the normal), kept the lowest InstanceNumber",
    )
    # Same answer whatever the input order: the choice is deterministic.
    again = select_series([duplicate, *reversed(headers)], rules=SelectionRules())
    assert [h.sop_instance_uid for h in again.chosen.headers] == [h.sop_instance_uid for h in kept]


def test_duplicates_count_once_towards_min_slices() -> None:
    headers = series(3)
    copies = [dataclasses.replace(h, sop_instance_uid=h.sop_instance_uid + ".1") for h in headers]
    assert rejection([*headers, *copies]) == ("too_few_slices", "3 slices, at least 5 needed")


def test_max_slices() -> None:
    assert rejection(series(6), SelectionRules(max_slices=5)) == ("too_large", "6 slices, at most 5 accepted")


def test_only_mr_is_no_ct_series() -> None:
    err = failure(series(modality="MR", series_description="T2 AX", number=7))
    assert err.code is ErrorCode.NO_CT_SERIES
    assert err.message == "no CT image series in the study (series 7 'T2 AX' (6 files): modality MR, not CT)"


def test_only_scouts_is_only_localizers() -> None:
    scouts = series(1, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), orientation=SAGITTAL, number=1)
    scouts += series(1, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), number=3)
    err = failure(scouts)
    assert err.code is ErrorCode.ONLY_LOCALIZERS
    assert err.message.startswith("only localizer (scout) images in the study; export the axial CT series (series 1")
    assert err.message.count("localizer (ImageType contains LOCALIZER)") == 2


def test_only_secondary_captures_is_only_derived() -> None:
    err = failure(series(sop_class_uid=SECONDARY_CAPTURE_PREFIX, series_description="Exam Summary", number=401))
    assert err.code is ErrorCode.ONLY_DERIVED
    assert "series 401 'Exam Summary' (6 files): secondary capture" in err.message


def test_candidate_failures_outrank_scouts_and_screenshots() -> None:
    scout = series(1, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), orientation=SAGITTAL, number=1)
    summary = series(3, sop_class_uid=SECONDARY_CAPTURE_PREFIX, number=401)
    one_slice = series(1, number=2)
    err = failure([*scout, *summary, *one_slice])
    assert err.code is ErrorCode.TOO_FEW_SLICES
    assert "series 2 'series 2' (1 file): 1 slice, at least 5 needed" in err.message
    assert "localizer" in err.message and "secondary capture" in err.message  # every series is listed


def test_mixed_candidate_failures_are_no_usable_series() -> None:
    few = series(2, number=2)
    sagittal = series(20, orientation=SAGITTAL, number=3)
    err = failure([*few, *sagittal])
    assert err.code is ErrorCode.NO_USABLE_SERIES
    assert err.message.startswith("no usable axial CT series in the study (")
    assert "2 slices, at least 5 needed" in err.message and "not axial" in err.message


def test_scout_plus_screenshots_only_is_no_usable_series() -> None:
    scout = series(1, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), orientation=SAGITTAL, number=1)
    summary = series(3, sop_class_uid=SECONDARY_CAPTURE_PREFIX, number=401)
    assert failure([*scout, *summary]).code is ErrorCode.NO_USABLE_SERIES


def test_giant_declared_size_is_too_large() -> None:
    err = failure(series(6, rows=65535, columns=65535))
    assert err.code is ErrorCode.TOO_LARGE
    assert "65535x65535 pixels per slice" in err.message


def test_too_large_series_does_not_block_a_good_one() -> None:
    giant = series(6, rows=4096, columns=4096, number=9)
    good = series(6, number=2)
    outcome = select_series([*giant, *good], rules=SelectionRules())
    assert outcome.chosen.summary.series_number == 2
    assert [r.code for r in outcome.selection.rejected] == ["too_large"]


def test_many_rejected_series_are_listed_on_one_bounded_line() -> None:
    headers = []
    for i in range(12):
        headers += series(1, modality="MR", number=100 + i)
    err = failure(headers)
    assert err.message.endswith("and 4 more series)")
    assert err.message.count("modality MR") == 8


def test_series_description_with_newlines_keeps_the_message_on_one_line() -> None:
    err = failure(series(2, series_description="HEAD\r\n  5 MM"))
    assert "series 2 'HEAD 5 MM' (2 files): 2 slices, at least 5 needed" in err.message


@pytest.mark.parametrize("offset_mm", [-0.005, 0.005])
@pytest.mark.parametrize("duplicate_number", [0, 99])
def test_duplicate_choice_depends_on_instance_number_not_position(offset_mm: float, duplicate_number: int) -> None:
    headers = series(6)  # InstanceNumbers 6..1; slice 2 has 4
    x, y, z = headers[2].image_position_mm or (0.0, 0.0, 0.0)
    duplicate = dataclasses.replace(
        headers[2],
        sop_instance_uid="9.9.9",
        instance_number=duplicate_number,
        image_position_mm=(x, y, z + offset_mm),
    )
    kept = select_series([*headers, duplicate], rules=SelectionRules()).chosen.headers
    expected = "9.9.9" if duplicate_number < 4 else headers[2].sop_instance_uid
    assert kept[2].sop_instance_uid == expected
