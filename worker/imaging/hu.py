"""Pixel data of one CT image to Hounsfield units.

Steps, in order:

1. check that there is pixel data, that its transfer syntax has an installed decoder and
   that the pixel format is one CT uses (one sample per pixel, 8/16/32 bits allocated);
2. decode (pydicom with pylibjpeg, pyjpegls: JPEG lossless, JPEG-LS, JPEG 2000, RLE, ...)
   to stored values, shape ``(rows, columns)``;
3. normalise stored values to ``BitsStored`` bits: unsigned values are masked (vendors put
   overlays in unused high bits), signed values are sign-extended from bit
   ``BitsStored - 1`` (PixelRepresentation 1);
4. mark padding: stored values equal to PixelPaddingValue, or between it and
   PixelPaddingRangeLimit inclusive. The padding value is compared in the stored-value
   domain, after the same bit normalisation (a signed image whose padding was written as
   US 63536 pads -2000);
5. ``HU = stored * RescaleSlope + RescaleIntercept`` (1 and 0 when absent), then padding
   pixels are set to air, :data:`AIR_HU`.

The result is float32 HU, shape ``(rows, columns)``, row-major as stored (row index
along ImageOrientationPatient[3:6], column index along ImageOrientationPatient[0:3]).
"""

from __future__ import annotations

import logging
import math
import struct
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID, JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes

from worker.core.errors import ErrorCode, StudyError
from worker.imaging.dicom_files import must_propagate, quiet_pydicom

logger = logging.getLogger(__name__)

#: HU given to padding pixels (outside the reconstruction field of view): air.
AIR_HU = -1024.0

_SUPPORTED_BITS_ALLOCATED = (8, 16, 32)
# JPEG start-of-frame markers (SOF0 to SOF15 but DHT, JPG, DAC) and JPEG-LS SOF55.
_SOF_MARKERS = frozenset({*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xF7})


def to_hu(ds: Dataset, *, label: str) -> npt.NDArray[np.float32]:
    """Decode one single-frame CT image and convert it to HU.

    ``ds``: a full data set (pixel data included) with ``file_meta.TransferSyntaxUID``.
    ``label``: how messages name the file (a path relative to the study folder).
    Returns float32 HU, shape ``(Rows, Columns)``. Raises :class:`StudyError`:
    ``MISSING_PIXEL_DATA``, ``UNSUPPORTED_COMPRESSION``, ``UNSUPPORTED_PIXEL_FORMAT``,
    ``TRUNCATED_FILE`` (less pixel data than Rows x Columns declare) or
    ``CORRUPT_PIXEL_DATA`` (the decoder failed or returned the wrong shape).
    """
    stored = decode_stored_values(ds, label=label)
    bits_stored = _int_attr(ds, "BitsStored", label=label)
    signed = _int_attr(ds, "PixelRepresentation", label=label) == 1
    stored = normalise_bits(stored, bits_stored=bits_stored, signed=signed)
    slope = _float_attr(ds, "RescaleSlope", default=1.0, label=label)
    intercept = _float_attr(ds, "RescaleIntercept", default=0.0, label=label)
    if slope == 0.0:
        raise StudyError(ErrorCode.UNSUPPORTED_PIXEL_FORMAT, f"{label}: RescaleSlope is 0")
    padding = padding_range(ds, bits_stored=bits_stored, signed=signed, label=label)
    return rescale_to_hu(stored, slope=slope, intercept=intercept, padding=padding)


def rescale_to_hu(
    stored: npt.NDArray[np.integer[Any]],
    *,
    slope: float,
    intercept: float,
    padding: tuple[int, int] | None,
) -> npt.NDArray[np.float32]:
    """``stored * slope + intercept`` as float32 HU; stored values in ``padding`` (inclusive
    ``(low, high)``, stored-value domain) become :data:`AIR_HU`. Shape is kept."""
    hu = stored.astype(np.float32)
    if slope != 1.0:
        hu *= np.float32(slope)
    if intercept != 0.0:
        hu += np.float32(intercept)
    if padding is not None:
        low, high = padding
        hu[(stored >= low) & (stored <= high)] = AIR_HU
    return hu


def normalise_bits(
    stored: npt.NDArray[np.integer[Any]], *, bits_stored: int, signed: bool
) -> npt.NDArray[np.integer[Any]]:
    """Keep the low ``bits_stored`` bits; sign-extend them when ``signed``.

    Returns ``stored`` itself when its dtype is exactly that wide with the right
    signedness, else a new int32 array (int64 from 32 bits stored). Idempotent on values
    already in range, so it is safe after decoders that did it.
    """
    full_width = bits_stored >= stored.dtype.itemsize * 8
    if full_width and bool(np.issubdtype(stored.dtype, np.signedinteger)) == signed:
        return stored
    values: npt.NDArray[np.integer[Any]] = stored.astype(np.int32 if bits_stored < 32 else np.int64)
    mask = values.dtype.type((1 << bits_stored) - 1)
    values &= mask
    if signed:
        sign_bit = values.dtype.type(1 << (bits_stored - 1))
        values = (values ^ sign_bit) - sign_bit
    return values


def padding_range(ds: Dataset, *, bits_stored: int, signed: bool, label: str) -> tuple[int, int] | None:
    """The inclusive stored-value range of padding pixels, or ``None`` without padding."""
    value = _optional_int(ds, "PixelPaddingValue", label=label)
    if value is None:
        return None
    limit = _optional_int(ds, "PixelPaddingRangeLimit", label=label)
    low = _normalise_scalar(value, bits_stored=bits_stored, signed=signed)
    high = low if limit is None else _normalise_scalar(limit, bits_stored=bits_stored, signed=signed)
    return (min(low, high), max(low, high))


def decode_stored_values(ds: Dataset, *, label: str) -> npt.NDArray[np.integer[Any]]:
    """Decoded stored values, shape ``(Rows, Columns)``, integer dtype; checks first.

    Every check that can be made from the header runs before the decoder allocates.
    """
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise StudyError(ErrorCode.UNSUPPORTED_PIXEL_FORMAT, f"{label}: float pixel data is not a CT image")
        raise StudyError(ErrorCode.MISSING_PIXEL_DATA, f"{label} has no pixel data")
    file_meta = getattr(ds, "file_meta", None)
    raw_syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if not raw_syntax:
        raise StudyError(ErrorCode.UNSUPPORTED_COMPRESSION, f"{label} does not say how its pixel data is encoded")
    syntax = UID(str(raw_syntax))
    syntax_name = syntax.name if syntax.is_transfer_syntax else str(syntax)
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise StudyError(
            ErrorCode.UNSUPPORTED_COMPRESSION, f"{label}: pixel data encoding {syntax_name} is not supported"
        ) from None
    if not decoder.is_available:
        raise StudyError(
            ErrorCode.UNSUPPORTED_COMPRESSION,
            f"{label}: no decoder is installed for pixel data encoding {syntax_name}",
        )
    rows = _int_attr(ds, "Rows", label=label)
    columns = _int_attr(ds, "Columns", label=label)
    bits_allocated = _int_attr(ds, "BitsAllocated", label=label)
    bits_stored = _int_attr(ds, "BitsStored", label=label)
    samples = _optional_int(ds, "SamplesPerPixel", label=label) or 1
    frames = _optional_int(ds, "NumberOfFrames", label=label) or 1
    representation = _int_attr(ds, "PixelRepresentation", label=label)
    if samples != 1:
        raise StudyError(
            ErrorCode.UNSUPPORTED_PIXEL_FORMAT,
            f"{label} is a colour image ({samples} samples per pixel), not CT",
        )
    if frames != 1:
        raise StudyError(ErrorCode.MULTIFRAME_UNSUPPORTED, f"{label} has {frames} frames; single-frame CT expected")
    if (
        bits_allocated not in _SUPPORTED_BITS_ALLOCATED
        or not 1 <= bits_stored <= bits_allocated
        or representation not in (0, 1)
        or rows <= 0
        or columns <= 0
    ):
        raise StudyError(
            ErrorCode.UNSUPPORTED_PIXEL_FORMAT,
            f"{label}: unsupported pixel format (BitsAllocated {bits_allocated}, BitsStored {bits_stored}, "
            f"PixelRepresentation {representation}, {rows}x{columns})",
        )
    if not syntax.is_encapsulated:
        expected = rows * columns * bits_allocated // 8
        available = len(ds.PixelData)
        if available < expected:
            raise StudyError(
                ErrorCode.TRUNCATED_FILE,
                f"{label} is truncated: {available} bytes of pixel data, {expected} expected for "
                f"{rows}x{columns} at {bits_allocated} bits",
            )
    else:
        _check_codestream_size(ds, syntax, rows=rows, columns=columns, label=label)
    try:
        with quiet_pydicom():
            arr: npt.NDArray[Any] = ds.pixel_array
    # Decoder plugins raise whatever their C libraries report (RuntimeError, ValueError,
    # OSError, pyo3's PanicException, ...): after the checks above, every one means bad data.
    except BaseException as exc:
        if must_propagate(exc):
            raise
        raise StudyError(
            ErrorCode.CORRUPT_PIXEL_DATA,
            f"{label}: the {syntax_name} pixel data could not be decoded ({_short(exc)})",
        ) from None
    if arr.shape != (rows, columns) or not np.issubdtype(arr.dtype, np.integer):
        raise StudyError(
            ErrorCode.CORRUPT_PIXEL_DATA,
            f"{label}: decoded pixel data has shape {arr.shape} ({arr.dtype}), {rows}x{columns} integers expected",
        )
    return arr


def codestream_size(frame: bytes, syntax: UID) -> tuple[int, int] | None:
    """``(rows, columns)`` a JPEG, JPEG-LS or JPEG 2000 codestream declares, else ``None``.

    Read from the frame header (JPEG SOFn / JPEG-LS SOF55) or the JPEG 2000 SIZ segment,
    so that a codestream claiming a huge image is refused before a decoder allocates it.
    ``None`` when the syntax is not one of these or the header cannot be found.
    """
    if syntax in JPEG2000TransferSyntaxes:
        # SOC then SIZ: Lsiz(2) Rsiz(2) Xsiz(4) Ysiz(4) XOsiz(4) YOsiz(4), big endian.
        if frame[:4] != b"\xff\x4f\xff\x51" or len(frame) < 24:
            return None
        xsiz, ysiz, x_offset, y_offset = struct.unpack(">IIII", frame[8:24])
        return (ysiz - y_offset, xsiz - x_offset)
    if syntax not in JPEGTransferSyntaxes and syntax not in JPEGLSTransferSyntaxes:
        return None
    if frame[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(frame):
        if frame[i] != 0xFF:
            return None
        marker = frame[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD9:  # markers without a length
            i += 2
            continue
        if marker in _SOF_MARKERS:
            if i + 9 > len(frame):
                return None
            height = int.from_bytes(frame[i + 5 : i + 7], "big")
            width = int.from_bytes(frame[i + 7 : i + 9], "big")
            return (height, width) if height else None  # height 0: set later by a DNL segment
        if marker == 0xDA:  # a scan before any frame header
            return None
        i += 2 + int.from_bytes(frame[i + 2 : i + 4], "big")
    return None


def _check_codestream_size(ds: Dataset, syntax: UID, *, rows: int, columns: int, label: str) -> None:
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    except BaseException as exc:  # pydicom's item parser raises ValueError, StopIteration, ...
        if must_propagate(exc):
            raise
        raise StudyError(
            ErrorCode.CORRUPT_PIXEL_DATA, f"{label}: the encapsulated pixel data has no readable frame"
        ) from None
    size = codestream_size(frame, syntax)
    if size is not None and size != (rows, columns):
        raise StudyError(
            ErrorCode.CORRUPT_PIXEL_DATA,
            f"{label}: the compressed image is {size[0]}x{size[1]} pixels, Rows/Columns say {rows}x{columns}",
        )


def _normalise_scalar(value: int, *, bits_stored: int, signed: bool) -> int:
    return int(normalise_bits(np.array([value], dtype=np.int64), bits_stored=bits_stored, signed=signed)[0])


def _optional_int(ds: Dataset, keyword: str, *, label: str) -> int | None:
    try:
        value = ds.get(keyword)
    except BaseException as exc:  # pydicom converts on access; a malformed value raises here
        if must_propagate(exc):
            raise
        value = "?"
    if value is None or value == "":
        return None
    if isinstance(value, bytes | bytearray) and len(value) in (2, 4):
        # An ambiguous US/SS value pydicom left raw (implicit VR without PixelRepresentation).
        return int.from_bytes(value, "little", signed=False)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise StudyError(
            ErrorCode.UNSUPPORTED_PIXEL_FORMAT, f"{label}: {keyword} is not an integer ({value!r})"
        ) from None


def _int_attr(ds: Dataset, keyword: str, *, label: str) -> int:
    value = _optional_int(ds, keyword, label=label)
    if value is None:
        raise StudyError(ErrorCode.UNSUPPORTED_PIXEL_FORMAT, f"{label} lacks {keyword}")
    return value


def _float_attr(ds: Dataset, keyword: str, *, default: float, label: str) -> float:
    try:
        value = ds.get(keyword)
    except BaseException as exc:  # pydicom converts on access; a malformed value raises here
        if must_propagate(exc):
            raise
        value = "?"
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise StudyError(ErrorCode.UNSUPPORTED_PIXEL_FORMAT, f"{label}: {keyword} is not a finite number")
    return number


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."
