"""Reading hostile files: no allocation from declared lengths, no patient data in pydicom's log."""

from __future__ import annotations

import logging
import os
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from tests.helpers.dicom_builders import write_ct_series
from worker.imaging.dicom_files import _MappedFile, read_dataset, read_header, redact_quoted


def _lying_length(path: Path, tag: tuple[int, int], length: int) -> None:
    data = path.read_bytes()
    at = data.find(struct.pack("<HH", *tag), 132)
    path.write_bytes(data[: at + 8] + struct.pack("<I", length) + data[at + 12 :])


def test_a_header_element_declaring_4_gb_is_not_allocated(tmp_path: Path) -> None:
    def edit(ds: Dataset, i: int) -> None:
        ds[0x0008103E] = DataElement(0x0008103E, "UT", "HEAD 5MM")  # SeriesDescription, long form

    written = write_ct_series(tmp_path, n_slices=1, nested=False, edit=edit)
    _lying_length(written.paths[0], (0x0008, 0x103E), 0xFFFFFFF0)
    peak = _peak(lambda: read_header(written.paths[0], root=tmp_path))
    assert peak < 16 * 1024 * 1024, f"{peak / 2**20:.0f} MB allocated for a 2 kB file"


def test_pixel_data_declaring_4_gb_is_not_allocated(tmp_path: Path) -> None:
    written = write_ct_series(tmp_path, n_slices=1, nested=False)
    _lying_length(written.paths[0], (0x7FE0, 0x0010), 0xFFFFFFF0)  # Pixel Data (OW)
    header = read_header(written.paths[0], root=tmp_path)
    assert header is not None and header.has_pixel_data
    peak = _peak(lambda: read_dataset(written.paths[0]))
    assert peak < 16 * 1024 * 1024, f"{peak / 2**20:.0f} MB allocated for a 2 kB file"


def _peak(work: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_mapped_file_behaves_like_a_file(tmp_path: Path) -> None:
    import mmap

    path = tmp_path / "f.bin"
    path.write_bytes(b"0123456789")
    with path.open("rb") as fp, mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        f = _MappedFile(mapped)
        assert f.read(4) == b"0123" and f.tell() == 4
        assert f.seek(2, os.SEEK_CUR) == 6 and f.read() == b"6789"
        assert f.seek(100) == 100 and f.read(5) == b"" and f.tell() == 100  # past the end, like a file
        assert f.seek(-3, os.SEEK_END) == 7 and f.read(100) == b"789"
        with pytest.raises(ValueError):
            f.seek(-1)


def test_pydicom_log_records_lose_the_quoted_value(caplog: pytest.LogCaptureFixture) -> None:
    import worker.imaging.dicom_files  # noqa: F401 - installs the filter

    with caplog.at_level(logging.WARNING, logger="pydicom"):
        logging.getLogger("pydicom").warning("Invalid value for VR PN: 'Zyxwvut^Qqqq'.")
        logging.getLogger("pydicom").warning('Invalid value for VR PN: "O\'Brien^Sean".')
        logging.getLogger("pydicom").warning("The value length (70) exceeds the maximum length of 64")
    text = caplog.text
    assert "Zyxwvut" not in text and "Brien" not in text
    assert "Invalid value for VR PN: '…'." in text
    assert "The value length (70) exceeds the maximum length of 64" in text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Invalid value for VR PN: 'Robert'); DROP TABLE x;--'.", "Invalid value for VR PN: '…'."),
        (
            'Value "1e999x" is not valid for elements with a VR of DS',
            "Value '…' is not valid for elements with a VR of DS",
        ),
        ("no value here", "no value here"),
    ],
)
def test_redact_quoted(text: str, expected: str) -> None:
    assert redact_quoted(text) == expected


def test_worker_processes_log_warnings_without_values(tmp_path: Path) -> None:
    # A subprocess: routing warnings through logging is process-wide (the worker's pool processes).
    import subprocess
    import sys

    code = (
        "import sys, warnings\n"
        "from worker.core.logs import configure_logging, route_warnings\n"
        "configure_logging(level='INFO', stream=sys.stdout)\n"
        "route_warnings()\n"
        "warnings.warn(\"Invalid value for VR PN: 'Zyxwvut^Qqqq'.\")\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    output = done.stdout + done.stderr
    assert "Invalid value for VR PN" in output and "Zyxwvut" not in output
