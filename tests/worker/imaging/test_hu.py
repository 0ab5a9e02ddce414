"""Pixel data to Hounsfield units: rescale, signedness, bits stored, padding, compression, errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import UID, JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless, RLELossless

from tests.helpers.dicom_builders import COMPRESSED_SYNTAXES, default_hu, write_ct_series
from worker.core.errors import ErrorCode, StudyError
from worker.imaging import hu as hu_module
from worker.imaging.hu import AIR_HU, codestream_size, normalise_bits, padding_range, rescale_to_hu, to_hu


def _one_slice(tmp_path: Path, **kwargs: Any) -> tuple[Dataset, np.ndarray]:
    written = write_ct_series(tmp_path / "s", n_slices=1, nested=False, **kwargs)
    return pydicom.dcmread(written.paths[0]), written.expected_hu[0]


def _testdata(name: str) -> Dataset:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not installed (pydicom-data)")
    return pydicom.dcmread(path)


def test_rescale_to_hu_applies_slope_intercept_and_padding() -> None:
    stored = np.array([[0, 5, 10, 11], [100, 200, 300, 400]], dtype=np.int32)
    hu = rescale_to_hu(stored, slope=2.0, intercept=-1000.0, padding=(5, 10))
    assert hu.dtype == np.float32
    np.testing.assert_array_equal(hu, [[-1000, AIR_HU, AIR_HU, -978], [-800, -600, -400, -200]])


def test_normalise_bits_masks_unsigned_and_sign_extends_signed() -> None:
    garbage_high_bits = np.array([0xF123, 0x0FFF, 0x1000], dtype=np.uint16)
    np.testing.assert_array_equal(normalise_bits(garbage_high_bits, bits_stored=12, signed=False), [0x123, 4095, 0])
    patterns = np.array([0x0FFF, 0x0800, 0x07FF, 0x0000], dtype=np.uint16)
    np.testing.assert_array_equal(normalise_bits(patterns, bits_stored=12, signed=True), [-1, -2048, 2047, 0])
    already = np.array([-2000, -1, 0, 3000], dtype=np.int16)
    np.testing.assert_array_equal(normalise_bits(already, bits_stored=16, signed=True), already)
    # Unsigned container, signed meaning (a decoder that ignored PixelRepresentation).
    unsigned = np.array([0xF830, 0x7FFF], dtype=np.uint16)
    np.testing.assert_array_equal(normalise_bits(unsigned, bits_stored=16, signed=True), [-2000, 32767])


@pytest.mark.parametrize(
    ("signed", "bits_stored", "intercept"),
    [(False, 12, -1024.0), (True, 12, 0.0), (True, 16, 0.0), (False, 16, -1024.0)],
)
def test_native_pixel_data_to_hu(tmp_path: Path, signed: bool, bits_stored: int, intercept: float) -> None:
    ds, expected = _one_slice(tmp_path, signed=signed, bits_stored=bits_stored, intercept=intercept)
    result = to_hu(ds, label="IM1")
    assert result.dtype == np.float32 and result.shape == (32, 32)
    np.testing.assert_array_equal(result, expected)
    assert result.min() < -900 and result.max() > 1400  # the ramp really spans the HU range


def test_slope_and_intercept_default_to_one_and_zero(tmp_path: Path) -> None:
    hu = default_hu(1, 32, 32) + 1024  # all >= 0, stored as-is
    ds, _ = _one_slice(tmp_path, slope=None, intercept=None, hu=hu)
    assert "RescaleSlope" not in ds and "RescaleIntercept" not in ds
    np.testing.assert_array_equal(to_hu(ds, label="IM1"), hu[0])


def test_non_unit_slope(tmp_path: Path) -> None:
    hu = np.full((1, 32, 32), 40.0)
    hu[0, :4] = -1000.0
    ds, _ = _one_slice(tmp_path, slope=0.5, intercept=-1024.0, hu=hu)
    np.testing.assert_array_equal(to_hu(ds, label="IM1"), hu[0])


def test_unused_high_bits_do_not_leak_into_hu(tmp_path: Path) -> None:
    ds, expected = _one_slice(tmp_path, signed=False, bits_stored=12, intercept=-1024.0)
    values = np.frombuffer(ds.PixelData, dtype=np.uint16).copy()
    values |= 0xF000  # an overlay in bits 12-15, as old scanners wrote
    ds.PixelData = values.tobytes()
    np.testing.assert_array_equal(to_hu(ds, label="IM1"), expected)


def test_signed_padding_value_becomes_air(tmp_path: Path) -> None:
    """GE style: signed 16-bit, PixelPaddingValue -2000 outside the field of view."""
    mask = np.zeros((1, 32, 32), dtype=bool)
    mask[0, :3, :] = True
    ds, expected = _one_slice(
        tmp_path, signed=True, bits_stored=16, intercept=0.0, padding_value=-2000, padding_mask=mask
    )
    result = to_hu(ds, label="IM1")
    assert np.all(result[0, :3] == AIR_HU)
    np.testing.assert_array_equal(result, expected)
    # Without padding handling the padding pixels would read -2000 HU.
    assert ds.PixelPaddingValue == -2000


def test_padding_value_written_unsigned_for_signed_data(tmp_path: Path) -> None:
    """A signed image whose padding was encoded as US 63536 (0xF830) pads -2000."""
    mask = np.zeros((1, 32, 32), dtype=bool)
    mask[0, -2:, :] = True
    ds, expected = _one_slice(
        tmp_path, signed=True, bits_stored=16, intercept=0.0, padding_value=-2000, padding_mask=mask
    )
    del ds.PixelPaddingValue
    ds.add_new(0x00280120, "US", 63536)
    np.testing.assert_array_equal(to_hu(ds, label="IM1"), expected)


def test_padding_range_limit_in_either_order(tmp_path: Path) -> None:
    stored_hu = default_hu(1, 32, 32)
    stored_hu[0, 0, :5] = [-1024, -1020, -1014, -1013, -1000]  # stored 0, 4, 10, 11, 24 with intercept -1024
    for value, limit in ((0, 10), (10, 0)):
        ds, _ = _one_slice(tmp_path / f"{value}", hu=stored_hu, padding_value=value, padding_range_limit=limit)
        result = to_hu(ds, label="IM1")
        np.testing.assert_array_equal(result[0, :5], [AIR_HU, AIR_HU, AIR_HU, -1013, -1000])
        assert padding_range(ds, bits_stored=12, signed=False, label="IM1") == (0, 10)


@pytest.mark.parametrize("syntax", COMPRESSED_SYNTAXES, ids=lambda s: UID(s).name)
@pytest.mark.parametrize("signed", [False, True])
def test_compressed_pixel_data_decodes_to_the_same_hu(tmp_path: Path, syntax: str, signed: bool) -> None:
    intercept = 0.0 if signed else -1024.0
    ds, expected = _one_slice(tmp_path, transfer_syntax=syntax, signed=signed, intercept=intercept)
    assert ds.file_meta.TransferSyntaxUID == syntax
    assert ds.file_meta.TransferSyntaxUID.is_compressed
    np.testing.assert_array_equal(to_hu(ds, label="IM1"), expected)


def test_real_ct_jpeg2000_lossless_equals_uncompressed() -> None:
    """pydicom-data's head CT slice, uncompressed and JPEG 2000 lossless, gives identical HU."""
    uncompressed = to_hu(_testdata("693_UNCR.dcm"), label="693_UNCR")
    j2k = to_hu(_testdata("693_J2KR.dcm"), label="693_J2KR")
    assert uncompressed.shape == (512, 512)
    np.testing.assert_array_equal(j2k, uncompressed)
    # Air outside the head and bone inside: a real CT in HU.
    assert uncompressed.min() <= -1000 and uncompressed.max() > 1000


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_bundled_compressed_files_equal_the_uncompressed_reference(name: str) -> None:
    reference = to_hu(_testdata("MR_small.dcm"), label="MR_small")
    np.testing.assert_array_equal(to_hu(_testdata(name), label=name), reference)


def test_ct_small_is_rescaled_with_its_intercept() -> None:
    """pydicom's CT_small: signed 16-bit, intercept -1024, padding -2000 declared but unused."""
    ds = _testdata("CT_small.dcm")
    raw = ds.pixel_array
    assert ds.PixelPaddingValue == -2000 and not np.any(raw == -2000)
    np.testing.assert_array_equal(to_hu(ds, label="CT_small"), raw.astype(np.float32) - 1024.0)


def _error(ds: Dataset) -> StudyError:
    with pytest.raises(StudyError) as info:
        to_hu(ds, label="dir/IM7")
    assert "\n" not in info.value.message
    return info.value


def test_missing_pixel_data(tmp_path: Path) -> None:
    ds, _ = _one_slice(tmp_path)
    del ds.PixelData
    err = _error(ds)
    assert err.code is ErrorCode.MISSING_PIXEL_DATA
    assert err.message == "dir/IM7 has no pixel data"


def test_pixel_data_shorter_than_declared(tmp_path: Path) -> None:
    ds, _ = _one_slice(tmp_path)
    ds.PixelData = ds.PixelData[:100]
    err = _error(ds)
    assert err.code is ErrorCode.TRUNCATED_FILE
    assert "100 bytes of pixel data, 2048 expected" in err.message


def test_unknown_transfer_syntax_is_unsupported_compression(tmp_path: Path) -> None:
    ds, _ = _one_slice(tmp_path)
    ds.file_meta.TransferSyntaxUID = UID("1.2.3.4.5.6")
    ds.PixelData = encapsulate([b"\x01" * 64])
    err = _error(ds)
    assert err.code is ErrorCode.UNSUPPORTED_COMPRESSION
    assert "1.2.3.4.5.6" in err.message


def test_known_transfer_syntax_without_a_decoder(tmp_path: Path) -> None:
    ds, _ = _one_slice(tmp_path)
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")  # MPEG2: no image decoder exists
    ds.PixelData = encapsulate([b"\x01" * 64])
    err = _error(ds)
    assert err.code is ErrorCode.UNSUPPORTED_COMPRESSION
    assert "MPEG2" in err.message


def test_decoder_not_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Missing:
        is_available = False

    monkeypatch.setattr(hu_module, "get_decoder", lambda uid: Missing())
    ds, _ = _one_slice(tmp_path)
    err = _error(ds)
    assert err.code is ErrorCode.UNSUPPORTED_COMPRESSION
    assert "no decoder is installed" in err.message


def test_garbage_in_a_jpeg2000_stream_is_corrupt(tmp_path: Path) -> None:
    ds, _ = _one_slice(tmp_path)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([bytes(range(256)) * 4])
    err = _error(ds)
    assert err.code is ErrorCode.CORRUPT_PIXEL_DATA
    assert "JPEG 2000" in err.message


def test_colour_and_multiframe_and_bad_slope_are_refused(tmp_path: Path) -> None:
    ds, _ = _one_slice(tmp_path)
    ds.SamplesPerPixel = 3
    assert _error(ds).code is ErrorCode.UNSUPPORTED_PIXEL_FORMAT
    ds.SamplesPerPixel = 1
    ds.NumberOfFrames = 4
    assert _error(ds).code is ErrorCode.MULTIFRAME_UNSUPPORTED
    del ds.NumberOfFrames
    ds.RescaleSlope = 0
    assert _error(ds).code is ErrorCode.UNSUPPORTED_PIXEL_FORMAT
    ds.RescaleSlope = 1
    ds.BitsStored = 17
    assert _error(ds).code is ErrorCode.UNSUPPORTED_PIXEL_FORMAT


@pytest.mark.parametrize("syntax", COMPRESSED_SYNTAXES, ids=lambda s: UID(s).name)
def test_codestream_larger_than_the_header_is_refused_before_decoding(tmp_path: Path, syntax: str) -> None:
    """Rows/Columns say 32x32 but the compressed frame holds 64x48: never decode into the wrong size."""
    written = write_ct_series(tmp_path / "s", n_slices=1, rows=64, columns=48, transfer_syntax=syntax)
    ds = pydicom.dcmread(written.paths[0])
    ds.Rows = ds.Columns = 32
    err = _error(ds)
    assert err.code is ErrorCode.CORRUPT_PIXEL_DATA
    if UID(syntax) != RLELossless:  # RLE has no size in its header: the decoder itself fails
        assert "the compressed image is 64x48 pixels, Rows/Columns say 32x32" in err.message


def test_codestream_size_reads_jpeg_and_jpeg2000_headers(tmp_path: Path) -> None:
    for syntax in (JPEG2000Lossless, JPEGLSLossless, JPEGLosslessSV1):
        written = write_ct_series(tmp_path / syntax, n_slices=1, rows=40, columns=56, transfer_syntax=syntax)
        ds = pydicom.dcmread(written.paths[0])
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        assert codestream_size(frame, UID(syntax)) == (40, 56)
    assert codestream_size(b"\xff\xd8\xff\xd9", UID(JPEGLosslessSV1)) is None
    assert codestream_size(b"garbage", UID(JPEG2000Lossless)) is None


def test_time_limit_during_decoding_is_not_reported_as_corrupt_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Celery's SoftTimeLimitExceeded (an Exception) must reach the task, not become a study error."""

    class SoftTimeLimitExceeded(Exception):
        pass

    ds, _ = _one_slice(tmp_path)

    def interrupted(self: Dataset) -> np.ndarray:
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(Dataset, "pixel_array", property(interrupted))
    with pytest.raises(SoftTimeLimitExceeded):
        to_hu(ds, label="IM1")
