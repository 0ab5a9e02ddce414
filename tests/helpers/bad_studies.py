"""Unusable studies for the ``ichvol segment`` contract: name -> (builder, expected code, message part).

Each builder writes one bad study into an empty folder. The same catalogue feeds the
command-line tests (exit code 2, one line, failed result.json) and the pipeline tests
(a failed run with its code while good studies in the same poll succeed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID

from tests.helpers.dicom_builders import (
    write_ct_series,
    write_mr_series,
    write_scout,
    write_secondary_capture,
)
from worker.core.errors import ErrorCode


@dataclass(frozen=True)
class BadStudy:
    build: Callable[[Path], None]
    code: ErrorCode
    message_part: str


def _empty(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)


def _no_dicom(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        (folder / f"IM{i}.dcm").write_text("not an image\n")


def _mr_only(folder: Path) -> None:
    write_mr_series(folder)


def _scouts_and_screens(folder: Path) -> None:
    write_scout(folder / "scout", n_images=2)


def _secondary_only(folder: Path) -> None:
    write_secondary_capture(folder / "sc")


def _one_slice(folder: Path) -> None:
    write_ct_series(folder, n_slices=1)


def _inconsistent(folder: Path) -> None:
    def edit(ds: Dataset, i: int) -> None:
        if i == 3:
            ds.PixelSpacing = ["0.7", "0.7"]

    write_ct_series(folder, edit=edit)


def _missing_pixels(folder: Path) -> None:
    def edit(ds: Dataset, i: int) -> None:
        if i == 2:
            del ds.PixelData

    write_ct_series(folder, edit=edit)


def _truncated(folder: Path) -> None:
    written = write_ct_series(folder)
    victim = written.paths[3]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 700])


def _unsupported(folder: Path) -> None:
    def edit(ds: Dataset, i: int) -> None:
        ds.file_meta.TransferSyntaxUID = UID("1.2.826.0.1.3680043.99.1.1")
        ds.PixelData = encapsulate([b"\x00\x11" * 200])
        ds["PixelData"].VR = "OB"

    write_ct_series(folder, edit=edit)


def _huge(folder: Path) -> None:
    def edit(ds: Dataset, i: int) -> None:
        ds.Rows = 65535
        ds.Columns = 65535

    write_ct_series(folder, edit=edit)


BAD_STUDIES: dict[str, BadStudy] = {
    "empty_folder": BadStudy(_empty, ErrorCode.EMPTY_STUDY, "no files"),
    "no_dicom": BadStudy(_no_dicom, ErrorCode.NO_DICOM, "is a DICOM image"),
    "no_ct_series": BadStudy(_mr_only, ErrorCode.NO_CT_SERIES, "not CT"),
    "only_scouts": BadStudy(_scouts_and_screens, ErrorCode.ONLY_LOCALIZERS, "localizer"),
    "only_secondary_captures": BadStudy(_secondary_only, ErrorCode.ONLY_DERIVED, "secondary capture"),
    "one_slice": BadStudy(_one_slice, ErrorCode.TOO_FEW_SLICES, "1 slice, at least 5 needed"),
    "inconsistent_geometry": BadStudy(_inconsistent, ErrorCode.INCONSISTENT_GEOMETRY, "PixelSpacing"),
    "missing_pixel_data": BadStudy(_missing_pixels, ErrorCode.MISSING_PIXEL_DATA, "no pixel data"),
    "truncated_file": BadStudy(_truncated, ErrorCode.TRUNCATED_FILE, "truncated"),
    "unsupported_compression": BadStudy(_unsupported, ErrorCode.UNSUPPORTED_COMPRESSION, "not supported"),
    "absurd_dimensions": BadStudy(_huge, ErrorCode.TOO_LARGE, "65535x65535"),
}
