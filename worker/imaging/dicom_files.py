"""Find the DICOM images in a study folder and read their headers (never their pixels).

A study folder is whatever the PACS exported: any nesting, any file names, DICOMDIR
and vendor index files, licence or text files. :func:`scan_study` walks it, skips what
is not a DICOM image instance, and returns one :class:`DicomHeader` per image with the
few attributes series selection needs, parsed into plain Python values (positions and
spacings in mm, LPS). Pixel data is never read here, so that size limits are checked
before anything is allocated from declared sizes.

Files without the 128-byte preamble and ``DICM`` prefix are still read when they start
like a DICOM data set (group 0x0002 or 0x0008) and then carry the essential UIDs:
``force=True`` alone happily "reads" garbage.

Symbolic links are never followed out of the study folder: linked folders are not
entered, and a linked file counts only when its target lies inside the folder.

Files are parsed from a read-only memory map, never through ``file.read(n)``: pydicom
reads each element with the length the file declares, and a buffered file object
allocates that many bytes before it finds the file shorter (a corrupt 2 kB file
declaring a 4 GB element cost 4 GB). A memory map returns at most what the file holds.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import stat
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from worker.core.errors import ErrorCode, SoftTimeLimitReached, StudyError, TransientError
from worker.core.logs import redact_quoted

logger = logging.getLogger(__name__)

_PREAMBLE_LENGTH = 128
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
# Data sets without a preamble begin with their first element's group, little endian.
_RAW_DATASET_STARTS = (b"\x02\x00", b"\x08\x00")
_PIXEL_DATA_GROUP = b"\xe0\x7f"
# Control-flow exceptions of the worker (Celery/billiard), matched by name to keep Celery out.
_PASS_THROUGH = frozenset({"SoftTimeLimitExceeded", "TimeLimitExceeded", "Terminated", "WorkerLostError"})


@dataclass(frozen=True)
class DicomHeader:
    """One DICOM image instance as series selection sees it (no pixel data).

    Geometry values are parsed floats: ``None`` when the attribute is absent, NaN
    components when it is present but malformed (wrong count or not a number), so that
    selection can tell "missing" from "invalid". Positions are LPS mm.
    """

    path: Path
    forced: bool  # read without preamble/file meta (raw data set)
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str | None
    transfer_syntax_uid: str | None
    modality: str | None
    image_type: tuple[str, ...]  # upper-case, stripped
    rows: int | None
    columns: int | None
    samples_per_pixel: int | None
    number_of_frames: int | None
    pixel_spacing_mm: tuple[float, float] | None  # (between rows, between columns)
    image_orientation: tuple[float, float, float, float, float, float] | None
    image_position_mm: tuple[float, float, float] | None
    slice_thickness_mm: float | None
    instance_number: int | None
    series_number: int | None
    series_description: str | None
    has_pixel_data: bool  # a Pixel Data element follows the header in the file


@dataclass(frozen=True)
class StudyFiles:
    """The outcome of scanning a study folder."""

    root: Path
    n_files: int  # regular files found (DICOM or not)
    headers: tuple[DicomHeader, ...]  # image instances, sorted by path
    n_ignored: int  # files that are not DICOM image instances
    warnings: tuple[str, ...]


class RedactQuotedValues(logging.Filter):
    """A logging filter that removes quoted values from records (see :func:`redact_quoted`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        redacted = redact_quoted(text)
        if redacted != text:
            record.msg, record.args = redacted, None
        return True


def _add_filter(name: str) -> None:
    target = logging.getLogger(name)
    if not any(isinstance(f, RedactQuotedValues) for f in target.filters):
        target.addFilter(RedactQuotedValues())


# pydicom logs each validation warning as well as raising it.
_add_filter("pydicom")


def must_propagate(exc: BaseException) -> bool:
    """Whether a broad "bad file" handler must re-raise ``exc`` instead of judging the file.

    Handlers around pydicom and the decoder plugins catch broadly (they raise many types,
    and pyo3-based plugins raise ``PanicException``, a BaseException), but interpreter
    exits and the worker's time limits must pass: the soft time limit
    (:class:`~worker.core.errors.SoftTimeLimitReached`, or the task runner's own exception
    where the tasks did not translate it) is raised wherever the code happens to be, and
    must not become "not DICOM".
    """
    if isinstance(exc, KeyboardInterrupt | SystemExit | GeneratorExit | SoftTimeLimitReached):
        return True
    return any(cls.__name__ in _PASS_THROUGH for cls in type(exc).__mro__)


@contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Keep pydicom's value-validation warnings out of the caller's warning filters.

    Vendor files routinely break VR rules (over-long DS, odd UIDs); pydicom warns and
    carries on. They are logged at debug level instead of surfacing as warnings.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for w in caught:
                # pydicom quotes offending values, which can be patient names or birth dates.
                logger.debug("pydicom: %s", redact_quoted(str(w.message))[:200])


#: A valid DICOM UID (PS3.5 section 9.1): numeric components without leading zeros, at most 64 characters.
_VALID_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

#: The instance UIDs the outputs (SEG, SR, overlay) repeat from the source images.
SOURCE_UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SOPInstanceUID")


def is_valid_uid(text: str) -> bool:
    """Whether ``text`` is a valid DICOM UID (digits and dots, no leading zeros, at most 64 characters)."""
    return len(text) <= 64 and _VALID_UID.match(text) is not None


def invalid_uids(ds: Dataset) -> dict[str, str]:
    """``{keyword: value}`` of the :data:`SOURCE_UID_KEYWORDS` present in ``ds`` but not valid UIDs.

    Call inside :func:`quiet_pydicom` (pydicom warns as it converts such a value).
    """
    found = {}
    for keyword in SOURCE_UID_KEYWORDS:
        value = _raw(ds, keyword)
        if value is not None and not is_valid_uid(text := str(value).strip().rstrip("\x00")):
            found[keyword] = text
    return found


def invalid_uid_warning(found: dict[str, list[str]], *, n_images: int) -> str | None:
    """The ``result.json`` warning for the invalid source UIDs of a series; None if there are none.

    ``found`` maps each keyword to its invalid values, one per image that carries one.
    """
    if not found:
        return None
    parts = []
    for keyword in SOURCE_UID_KEYWORDS:
        values = found.get(keyword, [])
        distinct = sorted(set(values))
        if not distinct:
            continue
        if keyword == "SOPInstanceUID":
            parts.append(f"SOPInstanceUID of {len(values)} of {n_images} images (e.g. {distinct[0]})")
        else:
            parts.append(f"{keyword} {', '.join(distinct[:3])}")
    return (
        "the source images carry UIDs that are not valid DICOM UIDs (digits and dots, no leading zeros, "
        f"at most 64 characters): {'; '.join(parts)}. The SEG, SR and overlay repeat them unchanged, "
        "and a PACS that checks UIDs may refuse them"
    )


def list_study_files(study_dir: Path, *, max_files: int) -> tuple[list[Path], list[str]]:
    """Regular files under ``study_dir`` (any depth), sorted; and warnings about skipped links.

    Raises ``EMPTY_STUDY`` when the folder does not exist, ``TOO_MANY_FILES`` as soon as
    more than ``max_files`` files are seen (before any is read).
    """
    if not study_dir.is_dir():
        raise StudyError(ErrorCode.EMPTY_STUDY, f"study folder {study_dir.name!r} does not exist")
    root = study_dir.resolve()
    files: list[Path] = []
    n_outside = 0
    # os.walk does not enter linked folders with followlinks=False.
    n_linked_dirs = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        n_linked_dirs += sum(1 for d in dirnames if (Path(dirpath) / d).is_symlink())
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_symlink():
                target = Path(os.path.realpath(path))
                if not target.is_relative_to(root):
                    n_outside += 1
                    continue
            try:
                mode = path.stat().st_mode  # follows an inside link; a dangling one fails
            except OSError:
                continue
            if not stat.S_ISREG(mode):  # FIFOs and devices would block or never end
                continue
            files.append(path)
            if len(files) > max_files:
                raise StudyError(
                    ErrorCode.TOO_MANY_FILES,
                    f"the study folder holds more than {max_files} files; split the export or raise ICHVOL_MAX_FILES",
                )
    found_warnings = []
    if n_outside:
        found_warnings.append(f"ignored {n_outside} symbolic link(s) pointing outside the study folder")
    if n_linked_dirs:
        found_warnings.append(f"did not enter {n_linked_dirs} symbolically linked folder(s)")
    return sorted(files), found_warnings


def scan_study(study_dir: Path, *, max_files: int) -> StudyFiles:
    """Walk ``study_dir`` and read the header of every DICOM image in it.

    Raises :class:`StudyError` ``EMPTY_STUDY`` (no files), ``NO_DICOM`` (files, but no
    DICOM image instance among them) or ``TOO_MANY_FILES``; :class:`TransientError`
    when a file cannot be read for a reason outside the study (I/O error).
    """
    files, scan_warnings = list_study_files(study_dir, max_files=max_files)
    if not files:
        raise StudyError(ErrorCode.EMPTY_STUDY, "the study folder is empty: no files to read")
    root = study_dir.resolve()
    headers: list[DicomHeader] = []
    for path in files:
        header = read_header(path, root=root)
        if header is not None:
            headers.append(header)
    n_ignored = len(files) - len(headers)
    if not headers:
        raise StudyError(
            ErrorCode.NO_DICOM,
            f"none of the {len(files)} files in the study folder is a DICOM image",
        )
    if n_ignored:
        logger.info("ignored %d files that are not DICOM images", n_ignored)
    return StudyFiles(
        root=root,
        n_files=len(files),
        headers=tuple(headers),
        n_ignored=n_ignored,
        warnings=tuple(scan_warnings),
    )


def group_by_series(headers: tuple[DicomHeader, ...] | list[DicomHeader]) -> dict[str, list[DicomHeader]]:
    """Headers grouped by SeriesInstanceUID, in order of first appearance."""
    groups: dict[str, list[DicomHeader]] = {}
    for header in headers:
        groups.setdefault(header.series_instance_uid, []).append(header)
    return groups


def read_header(path: Path, *, root: Path) -> DicomHeader | None:
    """The header of ``path`` if it is a DICOM image instance, else ``None``.

    "Image instance" means: readable as DICOM and carrying valid SOPClassUID,
    SOPInstanceUID and SeriesInstanceUID (a DICOMDIR or a vendor index file has none).
    """
    try:
        with path.open("rb") as fp:
            forced = _needs_force(fp)
            if forced is None:
                return None
            with _mapped(fp) as mapped:  # opening and mapping are the only file I/O
                try:
                    with quiet_pydicom():
                        ds = pydicom.dcmread(cast(BinaryIO, mapped), stop_before_pixels=True, force=forced)
                        at = mapped.tell()
                        # stop_before_pixels leaves the file at the Pixel Data tag, if there is one.
                        has_pixel_data = at < mapped.size() and mapped.read(2) == _PIXEL_DATA_GROUP
                        return _header_from_dataset(ds, path=path, forced=forced, has_pixel_data=has_pixel_data)
                # pydicom raises a zoo of exception types on damaged or non-DICOM bytes (EOFError,
                # struct.error, ValueError, KeyError, UnicodeDecodeError, RecursionError, and OSError
                # "No tag to read"): parsing a memory map does no I/O, so all mean "not a readable
                # DICOM image" here.
                except BaseException as exc:
                    if must_propagate(exc):
                        raise
                    logger.debug("not a readable DICOM image: %s (%s)", _relative(path, root), type(exc).__name__)
                    return None
    except FileNotFoundError:
        raise StudyError(
            ErrorCode.STUDY_CHANGED, f"file {_relative(path, root)} disappeared while the study was read"
        ) from None
    except OSError as exc:
        raise TransientError(f"could not read {_relative(path, root)}: {exc.strerror or exc}") from None


def read_dataset(path: Path, *, forced: bool | None = None, stop_before_pixels: bool = False) -> Dataset:
    """Read a whole data set (or its header) that :func:`read_header` accepted.

    ``forced``: whether the file is a raw data set without preamble (as
    :attr:`DicomHeader.forced`); ``None`` looks at the file. Raw data sets get a Transfer
    Syntax UID from their detected encoding so that their pixel data can be decoded.
    Raises ``STUDY_CHANGED`` when the file is gone, ``CORRUPT_PIXEL_DATA`` when it no
    longer parses, :class:`TransientError` on I/O errors.
    """
    try:
        with path.open("rb") as fp:
            if forced is None:
                forced = _needs_force(fp) is not False
            with _mapped(fp) as mapped:  # opening and mapping are the only file I/O
                try:
                    with quiet_pydicom():
                        ds = pydicom.dcmread(
                            cast(BinaryIO, mapped), stop_before_pixels=stop_before_pixels, force=forced
                        )
                # See read_header: any parse failure of a file that parsed before means damage.
                except BaseException as exc:
                    if must_propagate(exc):
                        raise
                    raise StudyError(
                        ErrorCode.CORRUPT_PIXEL_DATA,
                        f"file {path.name} can no longer be read as DICOM ({type(exc).__name__})",
                    ) from None
    except FileNotFoundError:
        raise StudyError(ErrorCode.STUDY_CHANGED, f"file {path.name} disappeared while the study was read") from None
    except OSError as exc:
        raise TransientError(f"could not read {path.name}: {exc.strerror or exc}") from None
    if forced and "TransferSyntaxUID" not in ds.file_meta:
        implicit = ds.original_encoding[0]
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    return ds


class _MappedFile:
    """A read-only binary file over a memory map, with a regular file's semantics: a read
    returns at most what is left, and seeking past the end is allowed (reads there return
    nothing), which pydicom relies on when it looks for a delimiter in a cut file."""

    def __init__(self, mapped: mmap.mmap | None) -> None:
        self._mapped = mapped
        self._size = mapped.size() if mapped is not None else 0
        self._position = 0

    def read(self, size: int | None = -1) -> bytes:
        start = min(self._position, self._size)
        end = self._size if size is None or size < 0 else min(self._size, start + size)
        self._position = max(self._position, end)
        return self._mapped[start:end] if self._mapped is not None else b""

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._position = base + offset
        return self._position

    def tell(self) -> int:
        return self._position

    def size(self) -> int:
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True


@contextmanager
def _mapped(fp: BinaryIO) -> Iterator[_MappedFile]:
    """A read-only memory map of the open file ``fp`` (an empty file maps to nothing)."""
    if os.fstat(fp.fileno()).st_size == 0:
        yield _MappedFile(None)
        return
    with mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        yield _MappedFile(mapped)


def _needs_force(fp: BinaryIO) -> bool | None:
    """False: a proper DICOM file; True: a raw data set worth a forced read; None: not DICOM."""
    head = fp.read(_PREAMBLE_LENGTH + 4)
    fp.seek(0)
    if len(head) == _PREAMBLE_LENGTH + 4 and head[_PREAMBLE_LENGTH:] == b"DICM":
        return False
    if head[:2] in _RAW_DATASET_STARTS:
        return True
    return None


def _header_from_dataset(ds: Dataset, *, path: Path, forced: bool, has_pixel_data: bool) -> DicomHeader | None:
    sop_class = _uid(ds, "SOPClassUID")
    sop_instance = _uid(ds, "SOPInstanceUID")
    series = _uid(ds, "SeriesInstanceUID")
    if sop_class is None or sop_instance is None or series is None:
        return None
    transfer_syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    return DicomHeader(
        path=path,
        forced=forced,
        sop_class_uid=sop_class,
        sop_instance_uid=sop_instance,
        series_instance_uid=series,
        study_instance_uid=_uid(ds, "StudyInstanceUID"),
        transfer_syntax_uid=str(transfer_syntax) if transfer_syntax else None,
        modality=_text(ds, "Modality"),
        image_type=_image_type(ds),
        rows=_int(ds, "Rows"),
        columns=_int(ds, "Columns"),
        samples_per_pixel=_int(ds, "SamplesPerPixel"),
        number_of_frames=_int(ds, "NumberOfFrames"),
        pixel_spacing_mm=_floats2(ds, "PixelSpacing"),
        image_orientation=_floats6(ds, "ImageOrientationPatient"),
        image_position_mm=_floats3(ds, "ImagePositionPatient"),
        slice_thickness_mm=_float(ds, "SliceThickness"),
        instance_number=_int(ds, "InstanceNumber"),
        series_number=_int(ds, "SeriesNumber"),
        series_description=_text(ds, "SeriesDescription"),
        has_pixel_data=has_pixel_data,
    )


def _raw(ds: Dataset, keyword: str) -> Any:
    """The value of ``keyword`` or None; a value pydicom cannot convert counts as absent."""
    try:
        value = ds.get(keyword)
    except BaseException as exc:  # malformed values raise on access (ValueError, TypeError, ...)
        if must_propagate(exc):
            raise
        return None
    if value is None or value == "" or (hasattr(value, "__len__") and len(value) == 0):
        return None
    return value


def _uid(ds: Dataset, keyword: str) -> str | None:
    value = _raw(ds, keyword)
    if value is None:
        return None
    text = str(value).strip().rstrip("\x00")
    return text if len(text) <= 64 and _UID.match(text) else None


def _text(ds: Dataset, keyword: str) -> str | None:
    value = _raw(ds, keyword)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _image_type(ds: Dataset) -> tuple[str, ...]:
    value = _raw(ds, "ImageType")
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else list(value)
    return tuple(str(v).strip().upper() for v in items)


def _int(ds: Dataset, keyword: str) -> int | None:
    value = _raw(ds, keyword)
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _float(ds: Dataset, keyword: str) -> float | None:
    value = _raw(ds, keyword)
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _floats(ds: Dataset, keyword: str, n: int) -> tuple[float, ...] | None:
    value = _raw(ds, keyword)
    if value is None:
        return None
    items = [value] if isinstance(value, str | int | float) else list(value)
    try:
        parsed = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        return (float("nan"),) * n
    return parsed if len(parsed) == n else (float("nan"),) * n


def _floats2(ds: Dataset, keyword: str) -> tuple[float, float] | None:
    v = _floats(ds, keyword, 2)
    return None if v is None else (v[0], v[1])


def _floats3(ds: Dataset, keyword: str) -> tuple[float, float, float] | None:
    v = _floats(ds, keyword, 3)
    return None if v is None else (v[0], v[1], v[2])


def _floats6(ds: Dataset, keyword: str) -> tuple[float, float, float, float, float, float] | None:
    v = _floats(ds, keyword, 6)
    return None if v is None else (v[0], v[1], v[2], v[3], v[4], v[5])


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return path.name
