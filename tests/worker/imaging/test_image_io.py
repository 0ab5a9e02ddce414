"""Image files: the real format from the content, declared sizes checked before decoding, grey output."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from worker.core.errors import ErrorCode, StudyError
from worker.imaging.image_io import read_grey_uint8, read_header, sniff_format, write_png


def _encode(ext: str, image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(ext, image)
    assert ok
    return bytes(data.tobytes())


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def test_sniff_format_reads_the_first_bytes() -> None:
    grey = np.zeros((8, 8), np.uint8)
    assert sniff_format(_encode(".png", grey)) == "png"
    assert sniff_format(_encode(".jpg", grey)) == "jpeg"
    assert sniff_format(_encode(".bmp", grey)) == "bmp"
    assert sniff_format(b"hello, world, this is not an image") is None


def test_jpeg_data_in_a_png_named_file_is_read_as_jpeg(tmp_path: Path) -> None:
    image = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))
    path = tmp_path / "slice.png"
    path.write_bytes(_encode(".jpg", image))
    read = read_grey_uint8(path)
    assert read.format == "jpeg" and read.pixels.shape == (32, 32) and read.pixels.dtype == np.uint8
    assert np.abs(read.pixels.astype(int) - image).max() < 12  # lossy, but the same picture


def test_grey_saved_as_colour_stays_exact_and_real_colour_becomes_luma(tmp_path: Path) -> None:
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
    (tmp_path / "grey.png").write_bytes(_encode(".png", np.dstack([grey] * 3)))
    read = read_grey_uint8(tmp_path / "grey.png")
    np.testing.assert_array_equal(read.pixels, grey)
    assert not read.was_colour
    colour = np.zeros((4, 4, 3), np.uint8)
    colour[..., 2] = 255  # pure red in BGR
    (tmp_path / "red.png").write_bytes(_encode(".png", colour))
    red = read_grey_uint8(tmp_path / "red.png")
    assert red.was_colour and int(red.pixels[0, 0]) == 76  # 0.299 * 255


def test_sixteen_bit_images_are_refused_from_the_header(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    path.write_bytes(_encode(".png", np.zeros((8, 8), np.uint16)))
    assert read_header(path.read_bytes(), name="deep.png").bits_per_sample == 16
    with pytest.raises(StudyError, match="16-bit") as info:
        read_grey_uint8(path)
    assert info.value.code == ErrorCode.UNSUPPORTED_PIXEL_FORMAT


def test_a_huge_declared_size_is_refused_before_decoding(tmp_path: Path) -> None:
    # A valid PNG signature and IHDR that declare 100000 x 100000 pixels, and no image data.
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    path = tmp_path / "bomb.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b""))
    with pytest.raises(StudyError, match="100000x100000") as info:
        read_grey_uint8(path)
    assert info.value.code == ErrorCode.TOO_LARGE
    # A JPEG whose frame header declares 60000 x 60000.
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, 60_000, 60_000, 1) + b"\x01\x11\x00"
    jpeg = tmp_path / "bomb.jpg"
    jpeg.write_bytes(b"\xff\xd8" + sof + b"\xff\xd9")
    with pytest.raises(StudyError, match="60000x60000"):
        read_grey_uint8(jpeg)


def test_truncated_and_foreign_files_name_the_file(tmp_path: Path) -> None:
    data = _encode(".png", np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(StudyError, match=r"^.*cut\.png") as info:
        read_grey_uint8(cut)
    assert info.value.code in (ErrorCode.CORRUPT_PIXEL_DATA, ErrorCode.TRUNCATED_FILE)
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    with pytest.raises(StudyError, match=r"notes\.png: is not a PNG, JPEG or BMP") as info:
        read_grey_uint8(text)
    assert info.value.code == ErrorCode.UNSUPPORTED_PIXEL_FORMAT
    with pytest.raises(StudyError, match=r"missing\.png"):
        read_grey_uint8(tmp_path / "missing.png")


def test_write_png_round_trips(tmp_path: Path) -> None:
    image = np.arange(12, dtype=np.uint8).reshape(3, 4)
    path = write_png(tmp_path / "sub" / "x.png", image)
    np.testing.assert_array_equal(read_grey_uint8(path).pixels, image)
    assert not list((tmp_path / "sub").glob(".*.tmp"))


@pytest.mark.realdata
def test_all_fourteen_real_slices_read_as_jpeg_whatever_their_names(drunet_slices: Path) -> None:
    paths = sorted(drunet_slices.glob("*.png"))
    assert len(paths) == 14
    channels = []
    for path in paths:
        image = read_grey_uint8(path)
        assert image.format == "jpeg" and image.pixels.shape == (1440, 1440)
        assert image.pixels.max() > 200  # bone is bright in a windowed slice
        channels.append(read_header(path.read_bytes(), name=path.name).channels)
    assert sorted(channels) == [1, 1] + [3] * 12
