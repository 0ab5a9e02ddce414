"""A corpus of hostile and broken studies, generated (never committed as binaries).

Each :class:`HostileKind` builds one study as ``{key below the study folder: bytes}``
and says how the pipeline must end it: a failed run with a specific
:class:`~worker.core.errors.ErrorCode`, or ``None`` when the data is actually usable and the
run must succeed. ``scripts/make_hostile_corpus.py`` writes the corpus into a folder or
straight into a bucket; tests/reliability/test_hostile_input.py runs every kind through
the worker's run processing and a batch of them through a real worker.

Keys are S3 object keys. Some kinds carry keys no local folder can hold (``..`` parts,
absolute paths, control characters, 1,000-character names): ``local=False``. Some of
those the loopback S3 server (SeaweedFS) refuses or rewrites, although AWS S3 stores
them as given: ``s3=False`` (the tests serve them from an in-memory bucket instead).

Research use only, not for clinical use: the images are tiny synthetic series.
"""

from __future__ import annotations

import io
import struct
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

from tests.helpers.dicom_builders import (
    SAGITTAL,
    encode_jpeg_lossless_sv1,
    set_unchecked,
    write_ct_series,
    write_mr_series,
    write_scout,
    write_secondary_capture,
)
from worker.core.errors import ErrorCode

Objects = dict[str, bytes]

#: Limits the expected codes assume (a worker with the defaults, 20,000 files and 2,000
#: slices, reads every header of ``ten_thousand_slices`` before refusing it as too large).
SUITE_LIMITS = {"max_files": 5000, "max_slices": 500}

#: Patient names that must survive storage intact and never reach a log.
HOSTILE_PATIENT_NAMES = (
    "Robert'); DROP TABLE studies;--^<script>alert(1)</script>",
    "山田^太郎",
    "Иванов^Иван",
    "محمد^أحمد",
    "Toolongforapersonnamecomponentbecauseitrunspastsixtyfourcharacters^X",  # PN allows 64
)


@dataclass(frozen=True)
class HostileKind:
    """One kind of bad study: how to build it and how the pipeline must end it."""

    name: str
    description: str
    build: Callable[[], Objects]
    code: ErrorCode | None  # None: usable, the run must succeed
    local: bool = True  # every key is a plain relative path (a folder can hold the study)
    s3: bool = True  # the loopback S3 server stores the keys as given

    @property
    def usable(self) -> bool:
        return self.code is None


# --------------------------------------------------------------------------------------------
# helpers


def _collect(folder: Path) -> Objects:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _written(writer: Callable[[Path], Any]) -> Objects:
    """Run a folder writer in a temporary folder and return its files as objects.

    pydicom's warnings about the invalid values written on purpose are silenced here.
    """
    with tempfile.TemporaryDirectory(prefix="ichvol-hostile-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        writer(Path(tmp))
        return _collect(Path(tmp))


def _series(edit: Callable[[Dataset, int], None] | None = None, **kwargs: Any) -> Objects:
    kwargs.setdefault("nested", False)
    return _written(lambda folder: write_ct_series(folder, edit=edit, **kwargs))


def _mutate(objects: Objects, change: Callable[[bytes], bytes], *, only: int | None = None) -> Objects:
    """Apply ``change`` to every object's bytes (or only to the ``only``-th in key order)."""
    out = {}
    for i, (key, data) in enumerate(sorted(objects.items())):
        out[key] = change(data) if only is None or i == only else data
    return out


def _set(keyword: str, value: object) -> Callable[[Dataset, int], None]:
    def edit(ds: Dataset, i: int) -> None:
        set_unchecked(ds, keyword, value)

    return edit


def _delete(keyword: str) -> Callable[[Dataset, int], None]:
    def edit(ds: Dataset, i: int) -> None:
        delattr(ds, keyword)

    return edit


def _element(tag: int, vr: str, value: object) -> Callable[[Dataset, int], None]:
    """Replace an element with one of another VR (``value`` as that VR holds it)."""

    def edit(ds: Dataset, i: int) -> None:
        ds[tag] = DataElement(tag, vr, value)

    return edit


def _replace_syntax_uid(data: bytes, new: str) -> bytes:
    """The same file with another TransferSyntaxUID in its file meta and the data set bytes
    untouched: the file then lies about how its data set is encoded."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    assert data[128:132] == b"DICM" and data[132:136] == b"\x02\x00\x00\x00", "unexpected file meta"
    (group_length,) = struct.unpack("<I", data[140:144])
    meta = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta
    meta.TransferSyntaxUID = UID(new)
    out = DicomBytesIO()
    write_file_meta_info(out, meta, enforce_standard=True)
    return data[:132] + out.getvalue() + data[144 + group_length :]


def _patch_element_length(data: bytes, tag: tuple[int, int], length: int) -> bytes:
    """Set the 4-byte length of an explicit-VR element with a long form (OB/OW/UN/UT...) or
    the 2-byte length of a short-form one, by tag, leaving its value as it is."""
    needle = struct.pack("<HH", *tag)
    index = data.find(needle, 132)
    assert index >= 0, f"tag {tag} not found"
    vr = data[index + 4 : index + 6]
    if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV"):
        return data[: index + 8] + struct.pack("<I", length) + data[index + 12 :]
    return data[: index + 6] + struct.pack("<H", min(length, 0xFFFF)) + data[index + 8 :]


# --------------------------------------------------------------------------------------------
# builders: files that are not DICOM, or broken DICOM


def _zero_byte_files() -> Objects:
    return {f"IM{i:04d}.dcm": b"" for i in range(6)}


def _truncated_in_header() -> Objects:
    return _mutate(_series(), lambda d: d[:300])


def _truncated_in_pixel_data() -> Objects:
    return _mutate(_series(), lambda d: d[:-700], only=3)


def _preamble_then_garbage() -> Objects:
    rng = np.random.default_rng(1)
    return {f"IM{i:04d}.dcm": b"\x00" * 128 + b"DICM" + rng.bytes(2048) for i in range(6)}


def _preamble_only() -> Objects:
    return {f"IM{i:04d}.dcm": b"\x00" * 128 + b"DICM" for i in range(6)}


def _non_dicom_named_dcm() -> Objects:
    return {
        "IM0001.dcm": b"Patient list\nnot an image\n",
        "IM0002.dcm": b"\x89PNG\r\n\x1a\n" + b"\x00" * 64,
        "IM0003.dcm": b"\xff\xd8\xff\xe0" + b"\x00" * 64 + b"\xff\xd9",
        "IM0004.dcm": b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n",
        "IM0005.dcm": b"<html><body>export failed</body></html>",
        "IM0006.dcm": b"\x08\x00",  # looks like a raw data set, two bytes long
    }


def _zip_archive() -> Objects:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for key, data in _series().items():
            zf.writestr(key, data)
    return {"study.dcm": buffer.getvalue()}


def _dicomdir_only() -> Objects:
    ds = Dataset()
    ds.FileSetID = "HOSTILE"
    ds.DirectoryRecordSequence = Sequence()
    ds.file_meta = Dataset()  # type: ignore[assignment]
    ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.1.3.10")
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.1")
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return {"DICOMDIR": buffer.getvalue()}


def _header_element_huge_length() -> Objects:
    # SeriesDescription (0008,103E) as UT with a declared length of ~4 GB in a 2 kB file.
    edit = _element(0x0008103E, "UT", "HEAD 5MM")
    return _mutate(_series(edit), lambda d: _patch_element_length(d, (0x0008, 0x103E), 0xFFFFFFF0))


def _pixel_data_length_beyond_file() -> Objects:
    return _mutate(_series(), lambda d: _patch_element_length(d, (0x7FE0, 0x0010), 0x7FFFFFF0), only=2)


def _pixel_data_shorter_than_declared() -> Objects:
    def edit(ds: Dataset, i: int) -> None:
        if i == 1:
            ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]

    return _series(edit)


def _deep_sequence_nesting() -> Objects:
    """Seven good slices, one of which carries a private sequence nested 20,000 levels deep
    (undefined lengths, spliced in before the Patient group): that file cannot be read, the
    other six make a usable series."""
    objects = _series(n_slices=7)
    level_open = struct.pack("<HH2sHI", 0x0009, 0x1010, b"SQ", 0, 0xFFFFFFFF) + struct.pack(
        "<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF
    )
    level_close = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    bomb = level_open * 20_000 + level_close * 20_000
    key = sorted(objects)[3]
    data = objects[key]
    at = data.find(b"\x10\x00\x10\x00PN", 132)  # (0010,0010) PatientName, explicit VR
    assert at > 0
    objects[key] = data[:at] + bomb + data[at:]
    return objects


def _many_tiny_slices(n: int) -> Callable[[], Objects]:
    """``n`` slices of 16x16 pixels, 0.5 mm apart: cloned from one file by patching
    fixed-width placeholders (SOP Instance UID and position), so 10,000 build in a second."""

    def build() -> Objects:
        placeholder_uid = "1.2.826.0.1.3680043.99.7.99999"
        placeholder_z = "+9999.999"

        def edit(ds: Dataset, i: int) -> None:
            ds.SOPInstanceUID = placeholder_uid
            ds.file_meta.MediaStorageSOPInstanceUID = placeholder_uid
            ds.ImagePositionPatient = ["-4", "-4", placeholder_z]

        (template,) = _series(edit, n_slices=1, rows=16, columns=16, shuffle_seed=None).values()
        objects = {}
        for i in range(n):
            data = template.replace(placeholder_uid.encode(), f"1.2.826.0.1.3680043.99.7.{i:05d}".encode())
            data = data.replace(placeholder_z.encode(), f"{i * 0.5:+09.3f}".encode())
            objects[f"S{i // 1000:02d}/IM{i:05d}.dcm"] = data
        return objects

    return build


# --------------------------------------------------------------------------------------------
# builders: geometry, sizes, pixel formats


def _one_by_one() -> Objects:
    return _series(rows=1, columns=1, hu=np.full((6, 1, 1), 40.0))


def _declared_65535() -> Objects:
    def edit(ds: Dataset, i: int) -> None:
        ds.Rows = 65535
        ds.Columns = 65535

    return _series(edit)


def _codestream_claims_huge() -> Objects:
    def edit(ds: Dataset, i: int) -> None:
        codestream = bytearray(encode_jpeg_lossless_sv1(np.zeros((32, 32), np.int64), precision=12))
        sof = codestream.find(b"\xff\xc3")
        codestream[sof + 5 : sof + 9] = struct.pack(">HH", 65535, 65535)
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
        ds.PixelData = encapsulate([bytes(codestream)])
        ds["PixelData"].VR = "OB"

    return _series(edit)


def _orientation_differs() -> Objects:
    def edit(ds: Dataset, i: int) -> None:
        if i == 2:
            ds.ImageOrientationPatient = ["1", "0", "0", "0", "0.9", "-0.43589"]

    return _series(edit)


def _sizes_differ() -> Objects:
    # five 32x32 slices and one 64x64 slice under one SeriesInstanceUID
    series_uid = generate_uid()
    small = _written(lambda f: write_ct_series(f, n_slices=5, series_instance_uid=series_uid, nested=False))
    big = _written(
        lambda f: write_ct_series(
            f,
            n_slices=1,
            rows=64,
            columns=64,
            series_instance_uid=series_uid,
            image_positions_mm=[(-4.0, -4.0, 40.0)],
            nested=False,
            file_suffix="-big",
        )
    )
    return {**small, **big}


def _all_same_position() -> Objects:
    return _series(image_positions_mm=[(-4.0, -4.0, 10.0)] * 6)


def _j2k_garbage() -> Objects:
    def edit(ds: Dataset, i: int) -> None:
        ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(range(256)) * 4])
        ds["PixelData"].VR = "OB"

    return _series(edit)


def _rle_garbage() -> Objects:
    def edit(ds: Dataset, i: int) -> None:
        ds.file_meta.TransferSyntaxUID = RLELossless
        ds.PixelData = encapsulate([struct.pack("<16I", 1, 64, *([0] * 14)) + b"\x7f" * 40])
        ds["PixelData"].VR = "OB"

    return _series(edit)


def _private_syntax() -> Objects:
    def edit(ds: Dataset, i: int) -> None:
        ds.file_meta.TransferSyntaxUID = UID("1.2.826.0.1.3680043.99.1.1")
        ds.PixelData = encapsulate([b"\x00\x11" * 200])
        ds["PixelData"].VR = "OB"

    return _series(edit)


def _lying_syntax(uid: str) -> Callable[[], Objects]:
    def build() -> Objects:
        return _mutate(_series(), lambda d: _replace_syntax_uid(d, uid))

    return build


def _float_pixel_data() -> Objects:
    def edit(ds: Dataset, i: int) -> None:
        del ds.PixelData
        ds.BitsAllocated = 32
        ds.FloatPixelData = np.zeros((32, 32), np.float32).tobytes()

    return _series(edit)


def _colour_screenshot() -> Objects:
    def edit(ds: Dataset, i: int) -> None:
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
        ds.BitsAllocated = 8
        ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelData = bytes(32 * 32 * 3)

    return _series(edit)


def _multiframe(sop_class: str) -> Callable[[], Objects]:
    def build() -> Objects:
        def edit(ds: Dataset, i: int) -> None:
            ds.SOPClassUID = sop_class
            ds.file_meta.MediaStorageSOPClassUID = sop_class
            ds.NumberOfFrames = 6
            ds.PixelData = ds.PixelData * 6

        return _series(edit, n_slices=1)

    return build


def _mr_named_like_ct() -> Objects:
    def edit(ds: Dataset, i: int) -> None:
        ds.SeriesDescription = "CT HEAD WO 5MM AXIAL"
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"

    return _series(
        edit,
        modality="MR",
        sop_class_uid=MRImageStorage,
        series_description="CT HEAD WO 5MM AXIAL",
    )


def _ct_modality_mr_class() -> Objects:
    return _series(sop_class_uid=MRImageStorage)


# --------------------------------------------------------------------------------------------
# builders: usable data in odd wrapping


def _deep_folder_nesting() -> Objects:
    deep = "/".join(f"d{i:03d}" for i in range(100))
    return {f"{deep}/{key}": data for key, data in _series().items()}


def _patient_names_metacharacters() -> Objects:
    def edit(ds: Dataset, i: int) -> None:
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = HOSTILE_PATIENT_NAMES[i % len(HOSTILE_PATIENT_NAMES)]
        ds.PatientID = "X'); DELETE FROM runs;--<b>"
        ds.StudyDescription = "<img src=x onerror=alert(1)> 頭部CT"
        ds.SeriesDescription = "HEAD 5MM '; DROP TABLE results;--"

    return _series(edit)


def _bogus_character_set() -> Objects:
    def edit(ds: Dataset, i: int) -> None:
        ds.SpecificCharacterSet = "ISO_IR 999"
        ds["PatientName"] = DataElement(0x00100010, "PN", b"M\xfcller^J\xf6rg")

    return _series(edit)


def _unicode_file_names() -> Objects:
    names = ["山田 太郎.dcm", "slice one.dcm", "\u202egpj.dcm", "Ünïcödé.dcm", "émoji-🧠.dcm", "'; rm -rf ~ #.dcm"]
    return {names[i]: data for i, data in enumerate(_series().values())}


# --------------------------------------------------------------------------------------------
# builders: object keys that must never become paths


def _good_plus(key: str) -> Callable[[], Objects]:
    def build() -> Objects:
        return {**_series(), key: b"\x00" * 128 + b"DICM"}

    return build


def _file_and_folder() -> Objects:
    objects = _series()
    first = sorted(objects)[0]
    return {**objects, f"{first}/IM9999.dcm": objects[first]}


# --------------------------------------------------------------------------------------------
# the catalogue

_S = ErrorCode


def _kinds() -> tuple[HostileKind, ...]:
    k = HostileKind
    return (
        # not DICOM, or DICOM that cannot be read
        k("zero_byte_files", "six zero-byte files named .dcm", _zero_byte_files, _S.NO_DICOM),
        k("truncated_in_header", "every file cut 300 bytes in, inside its header", _truncated_in_header, _S.NO_DICOM),
        k("truncated_in_pixel_data", "one file cut inside its pixel data", _truncated_in_pixel_data, _S.TRUNCATED_FILE),
        k(
            "preamble_then_garbage",
            "128-byte preamble and DICM, then random bytes",
            _preamble_then_garbage,
            _S.NO_DICOM,
        ),
        k("preamble_only", "128-byte preamble and DICM, nothing after", _preamble_only, _S.NO_DICOM),
        k("non_dicom_named_dcm", "text, PNG, JPEG, PDF and HTML files named .dcm", _non_dicom_named_dcm, _S.NO_DICOM),
        k("zip_archive", "the study zipped into one file named .dcm", _zip_archive, _S.NO_DICOM),
        k("dicomdir_only", "a DICOMDIR and no images", _dicomdir_only, _S.NO_DICOM),
        k(
            "header_element_huge_length",
            "a header element declaring ~4 GB in a 2 kB file",
            _header_element_huge_length,
            _S.NO_DICOM,
        ),
        k(
            "pixel_data_length_beyond_file",
            "Pixel Data declaring 2 GB in a 2 kB file",
            _pixel_data_length_beyond_file,
            _S.TRUNCATED_FILE,
        ),
        k(
            "pixel_data_shorter_than_declared",
            "Pixel Data holding a third of Rows x Columns",
            _pixel_data_shorter_than_declared,
            _S.TRUNCATED_FILE,
        ),
        # wrong value representations and geometry
        k(
            "wrong_vr_pixel_spacing",
            "PixelSpacing written as OB bytes",
            lambda: _series(_element(0x00280030, "OB", b"\x01\x02\x03\x04")),
            _S.INVALID_GEOMETRY,
        ),
        k(
            "wrong_vr_orientation",
            "ImageOrientationPatient written as text (LO)",
            lambda: _series(_element(0x00200037, "LO", "AXIAL HEAD FIRST")),
            _S.INVALID_GEOMETRY,
        ),
        k(
            "wrong_vr_rows",
            "Rows written as text (LO) 'abc'",
            lambda: _series(_element(0x00280010, "LO", "abc")),
            _S.UNSUPPORTED_PIXEL_FORMAT,
        ),
        k(
            "missing_position",
            "no ImagePositionPatient",
            lambda: _series(_delete("ImagePositionPatient")),
            _S.MISSING_GEOMETRY,
        ),
        k(
            "missing_orientation",
            "no ImageOrientationPatient",
            lambda: _series(_delete("ImageOrientationPatient")),
            _S.MISSING_GEOMETRY,
        ),
        k("missing_pixel_spacing", "no PixelSpacing", lambda: _series(_delete("PixelSpacing")), _S.MISSING_GEOMETRY),
        k(
            "nan_spacing",
            "PixelSpacing nan\\nan",
            lambda: _series(_set("PixelSpacing", ["nan", "nan"])),
            _S.INVALID_GEOMETRY,
        ),
        k(
            "inf_spacing",
            "PixelSpacing inf\\inf",
            lambda: _series(_set("PixelSpacing", ["inf", "inf"])),
            _S.INVALID_GEOMETRY,
        ),
        k(
            "negative_spacing",
            "PixelSpacing -0.5\\-0.5",
            lambda: _series(_set("PixelSpacing", ["-0.5", "-0.5"])),
            _S.INVALID_GEOMETRY,
        ),
        k("zero_spacing", "PixelSpacing 0\\0", lambda: _series(_set("PixelSpacing", ["0", "0"])), _S.INVALID_GEOMETRY),
        k(
            "nan_position",
            "ImagePositionPatient with NaN",
            lambda: _series(_set("ImagePositionPatient", ["0", "nan", "0"])),
            _S.INVALID_GEOMETRY,
        ),
        k(
            "contradictory_orientation",
            "row and column cosines identical (no slice normal)",
            lambda: _series(_set("ImageOrientationPatient", ["1", "0", "0", "1", "0", "0"])),
            _S.INVALID_GEOMETRY,
        ),
        k(
            "non_unit_orientation",
            "cosines of length 2",
            lambda: _series(_set("ImageOrientationPatient", ["2", "0", "0", "0", "2", "0"])),
            _S.INVALID_GEOMETRY,
        ),
        k("orientation_differs", "one slice tilted differently", _orientation_differs, _S.INCONSISTENT_GEOMETRY),
        k("sizes_differ", "one slice 64x64 among 32x32", _sizes_differ, _S.INCONSISTENT_GEOMETRY),
        k("sagittal_only", "a sagittal series", lambda: _series(orientation=SAGITTAL), _S.NOT_AXIAL),
        k("all_same_position", "six slices at one position", _all_same_position, _S.TOO_FEW_SLICES),
        # sizes
        k("one_by_one", "1x1 pixel slices", _one_by_one, _S.UNSUPPORTED_PIXEL_FORMAT),
        k("declared_65535", "Rows and Columns 65535 with 2 kB of pixels", _declared_65535, _S.TOO_LARGE),
        k(
            "codestream_claims_huge",
            "a JPEG codestream declaring 65535x65535 in a 32x32 image",
            _codestream_claims_huge,
            _S.CORRUPT_PIXEL_DATA,
        ),
        k(
            "ten_thousand_slices",
            "10,000 files of 16x16 pixels (more than the suite's ICHVOL_MAX_FILES)",
            _many_tiny_slices(10_000),
            _S.TOO_MANY_FILES,
        ),
        k(
            "too_many_slices",
            "600 slices of 16x16 pixels (more than the suite's ICHVOL_MAX_SLICES)",
            _many_tiny_slices(600),
            _S.TOO_LARGE,
        ),
        # pixel encodings
        k("private_transfer_syntax", "a made-up transfer syntax UID", _private_syntax, _S.UNSUPPORTED_COMPRESSION),
        k(
            "lying_syntax_jpeg",
            "says JPEG Lossless, holds native pixels",
            _lying_syntax(str(JPEGLosslessSV1)),
            _S.CORRUPT_PIXEL_DATA,
        ),
        k(
            "lying_syntax_big_endian",
            "says explicit VR big endian, is little endian",
            _lying_syntax(str(ExplicitVRBigEndian)),
            _S.NO_DICOM,
        ),
        k(
            "lying_syntax_implicit",
            "says implicit VR, is explicit VR",
            _lying_syntax(str(ImplicitVRLittleEndian)),
            None,
        ),
        k(
            "lying_syntax_deflate",
            "says deflated, is not compressed",
            _lying_syntax(str(DeflatedExplicitVRLittleEndian)),
            _S.NO_DICOM,
        ),
        k("j2k_garbage", "JPEG 2000 syntax with a garbage codestream", _j2k_garbage, _S.CORRUPT_PIXEL_DATA),
        k("rle_garbage", "RLE syntax with garbage segments", _rle_garbage, _S.CORRUPT_PIXEL_DATA),
        k("float_pixel_data", "Float Pixel Data instead of integers", _float_pixel_data, _S.UNSUPPORTED_PIXEL_FORMAT),
        k(
            "bits_allocated_12",
            "BitsAllocated 12",
            lambda: _series(_set("BitsAllocated", 12)),
            _S.UNSUPPORTED_PIXEL_FORMAT,
        ),
        k(
            "rescale_slope_zero",
            "RescaleSlope 0",
            lambda: _series(_set("RescaleSlope", "0")),
            _S.UNSUPPORTED_PIXEL_FORMAT,
        ),
        k(
            "rescale_slope_nan",
            "RescaleSlope nan",
            lambda: _series(_set("RescaleSlope", "nan")),
            _S.UNSUPPORTED_PIXEL_FORMAT,
        ),
        # what the images are
        k("mr_series", "an MR series only", lambda: _written(lambda f: write_mr_series(f)), _S.NO_CT_SERIES),
        k("mr_named_like_ct", "an MR series described 'CT HEAD ... AXIAL'", _mr_named_like_ct, _S.NO_CT_SERIES),
        k("ct_modality_mr_class", "Modality CT in MR Image Storage objects", _ct_modality_mr_class, _S.NO_CT_SERIES),
        k(
            "enhanced_ct_multiframe",
            "one Enhanced CT object of 6 frames",
            _multiframe(EnhancedCTImageStorage),
            _S.MULTIFRAME_UNSUPPORTED,
        ),
        k(
            "ct_class_multiframe",
            "CT Image Storage with NumberOfFrames 6",
            _multiframe(CTImageStorage),
            _S.MULTIFRAME_UNSUPPORTED,
        ),
        k("only_scouts", "localizers only", lambda: _written(lambda f: write_scout(f, n_images=2)), _S.ONLY_LOCALIZERS),
        k(
            "only_secondary_captures",
            "screenshots that say Modality CT",
            lambda: _written(lambda f: write_secondary_capture(f)),
            _S.ONLY_DERIVED,
        ),
        k("colour_screenshot", "RGB images in CT Image Storage", _colour_screenshot, _S.ONLY_DERIVED),
        # usable data in odd wrapping: must succeed
        k("deep_folder_nesting", "a good series 100 folders deep", _deep_folder_nesting, None),
        k(
            "deep_sequence_nesting",
            "a good series, one file nesting 20,000 sequences",
            _deep_sequence_nesting,
            None,
        ),
        k(
            "patient_names_metacharacters",
            "SQL and HTML metacharacters and non-Latin scripts in names and descriptions",
            _patient_names_metacharacters,
            None,
        ),
        # Usable pixels; the SEG writer reads the unknown character set as Latin-1.
        k(
            "bogus_character_set",
            "SpecificCharacterSet ISO_IR 999 with Latin-1 bytes",
            _bogus_character_set,
            None,
        ),
        k(
            "unicode_file_names",
            "spaces, CJK, a bidi override, emoji and shell metacharacters in file names",
            _unicode_file_names,
            None,
        ),
        # object keys that must never become paths
        k(
            "key_dot_dot",
            "a key climbing out of the study folder with ../",
            _good_plus("../../../../../tmp/ichvol-escape.dcm"),
            _S.UNSAFE_PATH,
            local=False,
            s3=False,
        ),
        k(
            "key_absolute_path",
            "a key with an absolute path below the study folder",
            _good_plus("/etc/ichvol-escape.dcm"),
            _S.UNSAFE_PATH,
            local=False,
            s3=False,
        ),
        k(
            "key_control_characters",
            "a key with ESC, BEL and a newline",
            _good_plus("IM\x1b[31m\x07\n.dcm"),
            _S.UNSAFE_PATH,
            local=False,
        ),
        k(
            "key_1000_characters",
            "a file name of 1,000 characters",
            _good_plus("n" * 996 + ".dcm"),
            _S.UNSAFE_PATH,
            local=False,
            s3=False,
        ),
        k(
            "key_backslashes",
            "a key with Windows separators climbing out",
            _good_plus("..\\..\\..\\ichvol-escape.dcm"),
            _S.UNSAFE_PATH,
            local=False,
            s3=False,
        ),
        k(
            "key_file_and_folder",
            "one name both a file and a folder",
            _file_and_folder,
            _S.UNSAFE_PATH,
            local=False,
            s3=False,
        ),
    )


HOSTILE_KINDS: dict[str, HostileKind] = {kind.name: kind for kind in _kinds()}


def write_to_folder(kind: HostileKind, folder: Path) -> int:
    """Write one kind into ``folder`` (which must not exist yet); returns the file count.

    Only kinds with ``local=True``: their keys are plain relative paths, checked again here.
    """
    from worker.infra.object_store import safe_relative_path

    if not kind.local:
        raise ValueError(f"{kind.name}: its object keys cannot be written to a folder")
    folder.mkdir(parents=True)
    objects = kind.build()
    for key, data in objects.items():
        rel = safe_relative_path(key, "")
        path = folder.joinpath(*rel.parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return len(objects)


def write_to_bucket(
    kind: HostileKind, client: Any, bucket: str, prefix: str, *, marker: str | None = "_COMPLETE"
) -> int:
    """PUT one kind below ``prefix`` (a folder, ending in ``/``), then the marker; returns the count."""
    from concurrent.futures import ThreadPoolExecutor

    objects = kind.build()
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(
            pool.map(lambda item: client.put_object(Bucket=bucket, Key=prefix + item[0], Body=item[1]), objects.items())
        )
    if marker:
        client.put_object(Bucket=bucket, Key=prefix + marker, Body=b"")
    return len(objects)


# --------------------------------------------------------------------------------------------
# a bucket that keeps any key


class MemoryStore:
    """An object store in memory that keeps keys exactly as given, as AWS S3 does (the
    loopback S3 server refuses or rewrites some hostile keys). Implements the project's
    ``ObjectStore`` protocol; downloads go through the project's own checked path
    (:func:`worker.infra.object_store.download_prefix`)."""

    def __init__(self, name: str = "memory") -> None:
        self.name = name
        self.objects: dict[str, bytes] = {}

    def put_objects(self, prefix: str, objects: Objects, *, marker: str | None = "_COMPLETE") -> None:
        for key, data in objects.items():
            self.objects[prefix + key] = data
        if marker:
            self.objects[prefix + marker] = b""

    def uri(self, key: str) -> str:
        return f"memory://{self.name}/{key}"

    def iter_objects(self, prefix: str) -> Any:
        import hashlib
        from datetime import UTC, datetime

        from worker.infra.object_store import ObjectInfo

        stamp = datetime(2024, 1, 2, tzinfo=UTC)
        for key in sorted(
            (k for k in self.objects if k.startswith(prefix)), key=lambda k: k.encode("utf-8", "surrogateescape")
        ):
            data = self.objects[key]
            yield ObjectInfo(key=key, etag=hashlib.md5(data).hexdigest(), size=len(data), last_modified=stamp)

    def download(self, key: str, dest: Path) -> None:
        from worker.infra.object_store import ObjectNotFoundError

        if key not in self.objects:
            raise ObjectNotFoundError(f"{self.uri(key)} does not exist")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(self.objects[key])

    def upload_file(self, key: str, src: Path, *, content_type: str | None = None) -> str:
        self.objects[key] = src.read_bytes()
        return self.uri(key)

    def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None) -> str:
        self.objects[key] = data
        return self.uri(key)

    def exists(self, key: str) -> bool:
        return key in self.objects

    def delete(self, key: str) -> None:
        self.objects.pop(key, None)

    def download_prefix(self, prefix: str, dest_dir: Path, *, keys: Any = None) -> list[Path]:
        from worker.infra.object_store import download_prefix

        return download_prefix(self, prefix, dest_dir, keys)
