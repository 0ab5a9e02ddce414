"""Series selection refuses images too small to measure, and unreadable sizes, before reading pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from tests.helpers.dicom_builders import write_ct_series
from worker.core.errors import ErrorCode, StudyError
from worker.imaging.dicom_files import scan_study
from worker.imaging.series_selection import MIN_IMAGE_SIDE, SelectionRules, select_series


def _select(folder: Path) -> StudyError:
    with pytest.raises(StudyError) as caught:
        select_series(scan_study(folder, max_files=100).headers, rules=SelectionRules())
    return caught.value


@pytest.mark.parametrize("side", [1, MIN_IMAGE_SIDE - 1])
def test_tiny_images_are_refused(tmp_path: Path, side: int) -> None:
    write_ct_series(tmp_path, rows=side, columns=32, hu=np.zeros((6, side, 32)))
    error = _select(tmp_path)
    assert error.code is ErrorCode.UNSUPPORTED_PIXEL_FORMAT and f"{side}x32" in error.message


def test_the_smallest_accepted_image(tmp_path: Path) -> None:
    write_ct_series(tmp_path, rows=MIN_IMAGE_SIDE, columns=MIN_IMAGE_SIDE, hu=np.zeros((6, 16, 16)))
    outcome = select_series(scan_study(tmp_path, max_files=100).headers, rules=SelectionRules())
    assert outcome.chosen.rows == MIN_IMAGE_SIDE


def test_unreadable_rows_in_ct_images_are_a_pixel_format_problem(tmp_path: Path) -> None:
    def edit(ds: Dataset, i: int) -> None:
        ds[0x00280010] = DataElement(0x00280010, "LO", "abc")

    write_ct_series(tmp_path, edit=edit)
    error = _select(tmp_path)
    assert error.code is ErrorCode.UNSUPPORTED_PIXEL_FORMAT and "unreadable" in error.message
