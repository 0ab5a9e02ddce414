"""2-D image files (PNG, JPEG, BMP): sniff the real format, check the declared size, read 8-bit grey.

The seed's slices are 8-bit images already windowed for the brain; some are JPEG data in
files named ``.png``. So the extension is never trusted: the first bytes decide the format
(:func:`sniff_format`), the header's declared width, height and bit depth are parsed and
checked against the limits (:func:`read_header`) *before* OpenCV allocates anything, and
only then is the image decoded.

Grey output: a single-channel image is used as is; a colour image whose channels are equal
(a grey slice saved as RGB) gives that channel; a real colour image is converted with the
ITU-R BT.601 luma weights (OpenCV's ``BGR2GRAY``) and flagged ``was_colour``. An alpha
channel is dropped. EXIF orientation is ignored (images and masks must stay aligned
pixel for pixel). Arrays are ``(rows, columns)`` uint8.

Bad files raise :class:`worker.core.errors.StudyError` naming the file: not an image of a
supported format, truncated or corrupt data, 16-bit samples, or too many pixels.
"""

from __future__ import annotations

import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from worker.core.errors import ErrorCode, StudyError

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_IMAGE_BYTES",
    "MAX_IMAGE_PIXELS",
    "GreyImage",
    "ImageHeader",
    "read_grey_uint8",
    "read_header",
    "sniff_format",
    "write_png",
]

MAX_IMAGE_BYTES = 256 * 1024 * 1024
MAX_IMAGE_PIXELS = 8192 * 8192
# Extensions looked at when listing a folder (the content still decides the format).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp"})

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (SOF0-SOF15 except DHT C4, JPG C8, DAC CC).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}

UInt8Image = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class ImageHeader:
    """What a file's header declares (nothing decoded yet)."""

    format: str  # "png", "jpeg" or "bmp"
    rows: int
    columns: int
    bits_per_sample: int  # 8 for the images this project reads
    channels: int


@dataclass(frozen=True)
class GreyImage:
    """An 8-bit grey image ``(rows, columns)`` and where it came from."""

    pixels: UInt8Image
    format: str
    was_colour: bool  # converted from a colour image with unequal channels


def sniff_format(head: bytes) -> str | None:
    """``"png"``, ``"jpeg"`` or ``"bmp"`` from the first bytes of a file; ``None`` otherwise."""
    if head.startswith(_PNG_SIGNATURE):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"BM") and len(head) >= 26:
        return "bmp"
    return None


def _bad(name: str, message: str, code: ErrorCode = ErrorCode.CORRUPT_PIXEL_DATA) -> StudyError:
    return StudyError(code, f"{name}: {message}")


def _png_header(data: bytes, name: str) -> ImageHeader:
    # Signature (8), then the IHDR chunk: length (4), "IHDR", width, height, depth, colour type.
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise _bad(name, "the PNG header is truncated or malformed", ErrorCode.TRUNCATED_FILE)
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    channels = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}.get(colour)
    if channels is None:
        raise _bad(name, f"unknown PNG colour type {colour}")
    bits = 8 if colour == 3 else depth  # palette indices expand to 8-bit colours
    return ImageHeader("png", int(height), int(width), int(bits), channels)


def _jpeg_header(data: bytes, name: str) -> ImageHeader:
    i = 2
    n = len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise _bad(name, "the JPEG markers are corrupt")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker in _JPEG_SOF:
            if i + 10 > n:
                break
            precision, height, width, components = struct.unpack(">BHHB", data[i + 4 : i + 10])
            return ImageHeader("jpeg", int(height), int(width), int(precision), int(components))
        if marker == 0xDA or length < 2:  # scan data before any frame header
            raise _bad(name, "the JPEG has no frame header before its image data")
        i += 2 + length
    raise _bad(name, "the JPEG header is truncated", ErrorCode.TRUNCATED_FILE)


def _bmp_header(data: bytes, name: str) -> ImageHeader:
    if len(data) < 30:
        raise _bad(name, "the BMP header is truncated", ErrorCode.TRUNCATED_FILE)
    width, height = struct.unpack("<ii", data[18:26])
    (bpp,) = struct.unpack("<H", data[28:30])
    channels = {8: 1, 24: 3, 32: 4}.get(bpp)
    if channels is None:
        raise _bad(
            name, f"{bpp}-bit BMP images are not supported (8, 24 or 32 bits)", ErrorCode.UNSUPPORTED_PIXEL_FORMAT
        )
    return ImageHeader("bmp", abs(int(height)), abs(int(width)), 8, channels)


def read_header(data: bytes, *, name: str) -> ImageHeader:
    """The declared format, size, bit depth and channels of an image file's bytes.

    ``name`` labels the file in error messages. Raises :class:`StudyError` for anything
    that is not a PNG, JPEG or BMP image, or whose header is truncated or corrupt.
    """
    fmt = sniff_format(data[:32])
    if fmt is None:
        raise _bad(
            name, "is not a PNG, JPEG or BMP image (the file's first bytes say so)", ErrorCode.UNSUPPORTED_PIXEL_FORMAT
        )
    reader = {"png": _png_header, "jpeg": _jpeg_header, "bmp": _bmp_header}[fmt]
    return reader(data, name)


def _check_header(header: ImageHeader, *, name: str, max_pixels: int) -> None:
    if header.rows < 1 or header.columns < 1:
        raise _bad(name, f"declares an empty image ({header.rows}x{header.columns})")
    if header.rows * header.columns > max_pixels:
        raise _bad(
            name,
            f"is {header.rows}x{header.columns} pixels, more than the limit of {max_pixels} pixels",
            ErrorCode.TOO_LARGE,
        )
    if header.bits_per_sample != 8:
        raise _bad(
            name,
            f"has {header.bits_per_sample}-bit samples; export the slices as 8-bit windowed images",
            ErrorCode.UNSUPPORTED_PIXEL_FORMAT,
        )


def read_grey_uint8(path: Path, *, max_pixels: int = MAX_IMAGE_PIXELS, label: str | None = None) -> GreyImage:
    """Read an 8-bit PNG, JPEG or BMP (whatever its extension) as grey ``(rows, columns)`` uint8.

    ``label`` names the file in errors (default: its name). Raises :class:`StudyError` for
    unreadable, unsupported, corrupt, non-8-bit or oversized images; nothing is decoded
    before the declared size is checked.
    """
    path = Path(path)
    name = label or path.name
    try:
        size = path.stat().st_size
        if size > MAX_IMAGE_BYTES:
            raise _bad(name, f"is {size} bytes, more than {MAX_IMAGE_BYTES} for one image", ErrorCode.TOO_LARGE)
        data = path.read_bytes()
    except OSError as exc:
        raise _bad(name, f"cannot be read ({exc.strerror or exc})") from None
    header = read_header(data, name=name)
    _check_header(header, name=name, max_pixels=max_pixels)
    decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if decoded is None:
        raise _bad(name, f"the {header.format.upper()} data cannot be decoded (truncated or corrupt)")
    if decoded.dtype != np.uint8:
        raise _bad(name, f"decodes to {decoded.dtype} samples, not 8-bit", ErrorCode.UNSUPPORTED_PIXEL_FORMAT)
    if decoded.shape[:2] != (header.rows, header.columns):
        raise _bad(name, f"decodes to {decoded.shape[:2]} pixels, its header says {header.rows}x{header.columns}")
    pixels, was_colour = _to_grey(decoded)
    return GreyImage(pixels=pixels, format=header.format, was_colour=was_colour)


def _to_grey(decoded: np.ndarray) -> tuple[UInt8Image, bool]:
    if decoded.ndim == 2:
        return np.ascontiguousarray(decoded), False
    channels = decoded.shape[2]
    if channels == 1:
        return np.ascontiguousarray(decoded[:, :, 0]), False
    if channels == 2:  # grey + alpha
        return np.ascontiguousarray(decoded[:, :, 0]), False
    colour = decoded[:, :, :3]
    if np.array_equal(colour[:, :, 0], colour[:, :, 1]) and np.array_equal(colour[:, :, 0], colour[:, :, 2]):
        return np.ascontiguousarray(colour[:, :, 0]), False
    grey: UInt8Image = np.asarray(cv2.cvtColor(np.ascontiguousarray(colour), cv2.COLOR_BGR2GRAY), dtype=np.uint8)
    return grey, True


def write_png(path: Path, image: np.ndarray) -> Path:
    """Write a uint8 grey ``(rows, columns)`` or BGR ``(rows, columns, 3)`` image as PNG, atomically."""
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"expected a uint8 grey or BGR image, got {array.dtype} {array.shape}")
    ok, encoded = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise OSError(f"could not encode {Path(path).name} as PNG")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(encoded.tobytes())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    finally:
        Path(tmp_name).unlink(missing_ok=True)
    return path
