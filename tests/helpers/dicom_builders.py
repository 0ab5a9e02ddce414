"""Write small synthetic DICOM studies with pydicom, for tests of the DICOM input half.

:func:`write_ct_series` writes one CT series whose expected HU, sorted order and
geometry are known, with every knob the loader must handle: orientation (tilt),
uneven positions, rescale, signed or unsigned storage with fewer bits stored than
allocated, pixel padding, compressed transfer syntaxes, shuffled file names and
instance numbers, nested folders, files without preamble. Thin wrappers add the other
series a real export carries: a scout, secondary captures, an MR series.

Compression uses pydicom's encoders (RLE natively, JPEG-LS via pyjpegls, JPEG 2000 via
pylibjpeg-openjpeg) and, for JPEG lossless (process 14, selection value 1) which no
installed package encodes, the minimal encoder :func:`encode_jpeg_lossless_sv1`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)

COMPRESSED_SYNTAXES = (RLELossless, JPEGLSLossless, JPEG2000Lossless, JPEGLosslessSV1)


def tilted_orientation(tilt_deg: float) -> tuple[float, float, float, float, float, float]:
    """ImageOrientationPatient of an axial slice with gantry tilt about the patient x axis.

    Rows stay along +x; columns along (0, cos t, -sin t), as GE writes tilted heads; the
    normal is (0, sin t, cos t), ``tilt_deg`` from patient z.
    """
    t = np.radians(tilt_deg)
    return (1.0, 0.0, 0.0, 0.0, float(np.cos(t)), float(-np.sin(t)))


def normal_of(orientation: Sequence[float]) -> npt.NDArray[np.float64]:
    row = np.asarray(orientation[:3], dtype=np.float64)
    col = np.asarray(orientation[3:], dtype=np.float64)
    n = np.cross(row, col)
    return n / np.linalg.norm(n)


def positions_along_normal(
    offsets_mm: Sequence[float],
    *,
    orientation: Sequence[float] = AXIAL,
    origin_mm: Sequence[float] = (-4.0, -4.0, 10.0),
    shear_axis: Sequence[float] | None = None,
) -> list[tuple[float, float, float]]:
    """ImagePositionPatient of slices at ``offsets_mm`` along the normal from ``origin_mm``.

    With ``shear_axis`` (a unit vector) the positions move along it instead, scaled so that
    their projections on the normal are still ``offsets_mm``: the way a tilted gantry's
    table positions (along z) project onto the tilted normal.
    """
    normal = normal_of(orientation)
    axis = normal if shear_axis is None else np.asarray(shear_axis, dtype=np.float64)
    scale = 1.0 / float(axis @ normal)
    origin = np.asarray(origin_mm, dtype=np.float64)
    return [tuple(float(v) for v in origin + axis * (d * scale)) for d in offsets_mm]  # type: ignore[misc]


@dataclass(frozen=True)
class WrittenSeries:
    """What :func:`write_ct_series` wrote and what a correct loader must return for it."""

    series_instance_uid: str
    study_instance_uid: str
    paths: tuple[Path, ...]  # in position order (sorted ascending along the normal)
    sop_instance_uids: tuple[str, ...]  # in position order
    image_positions_mm: tuple[tuple[float, float, float], ...]  # in position order
    positions_mm: npt.NDArray[np.float64]  # projected on the normal, ascending
    expected_hu: npt.NDArray[np.float32]  # (n, rows, cols), in position order
    stored: npt.NDArray[np.int64]  # stored values written, (n, rows, cols), position order


def default_hu(n_slices: int, rows: int, columns: int, *, seed: int = 0) -> npt.NDArray[np.float32]:
    """A distinct HU image per slice: a ramp from -1000 to ~1500 plus the slice index * 7."""
    rng = np.random.default_rng(seed)
    base = np.linspace(-1000, 1500, rows * columns, dtype=np.float64).reshape(rows, columns)
    noise = rng.integers(-20, 20, size=(n_slices, rows, columns))
    return (base[None] + noise + 7 * np.arange(n_slices)[:, None, None]).round().astype(np.float32)


def write_ct_series(
    folder: Path,
    *,
    n_slices: int = 6,
    rows: int = 32,
    columns: int = 32,
    pixel_spacing_mm: tuple[float, float] = (0.5, 0.5),
    orientation: Sequence[float] = AXIAL,
    image_positions_mm: Sequence[Sequence[float]] | None = None,
    slice_gap_mm: float = 5.0,
    slice_thickness_mm: float | None = 5.0,
    hu: npt.NDArray[np.floating] | None = None,
    slope: float | None = 1.0,
    intercept: float | None = -1024.0,
    signed: bool = False,
    bits_allocated: int = 16,
    bits_stored: int = 12,
    padding_value: int | None = None,
    padding_range_limit: int | None = None,
    padding_mask: npt.NDArray[np.bool_] | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    modality: str = "CT",
    sop_class_uid: str = CTImageStorage,
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    series_number: int = 2,
    series_description: str = "HEAD 5MM",
    series_instance_uid: str | None = None,
    study_instance_uid: str | None = None,
    patient_id: str = "PHANTOM-1",
    shuffle_seed: int | None = 1,
    nested: bool = True,
    preamble: bool = True,
    file_suffix: str = "",
    edit: Callable[[Dataset, int], None] | None = None,
) -> WrittenSeries:
    """Write one single-frame series under ``folder`` and return what a loader should read.

    ``hu``: desired HU per slice in position order, ``(n, rows, cols)``; default
    :func:`default_hu`. Stored values are ``round((hu - intercept) / slope)`` and must fit
    ``bits_stored`` (signed or not). Where ``padding_mask`` (same shape) is true the stored
    value is ``padding_value`` and the expected HU is -1024.

    ``image_positions_mm``: ImagePositionPatient per slice in the order given (they are
    sorted by projection for the expectations); default ``n_slices`` positions
    ``slice_gap_mm`` apart along the normal.

    File names and InstanceNumbers are shuffled with ``shuffle_seed`` (unrelated to
    position); with ``nested`` files go to two levels of sub-folders. ``edit(ds, i)`` may
    change the data set of the ``i``-th slice (position order) just before writing.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if image_positions_mm is None:
        image_positions_mm = positions_along_normal(
            [i * slice_gap_mm for i in range(n_slices)], orientation=orientation
        )
    n_slices = len(image_positions_mm)
    normal = normal_of(orientation)
    projected = np.array([np.asarray(p, dtype=np.float64) @ normal for p in image_positions_mm])
    order = np.argsort(projected, kind="stable")
    positions_sorted = [tuple(float(v) for v in image_positions_mm[i]) for i in order]
    if hu is None:
        hu = default_hu(n_slices, rows, columns)
    hu = np.asarray(hu, dtype=np.float64)
    used_slope = 1.0 if slope is None else slope
    used_intercept = 0.0 if intercept is None else intercept
    stored = np.round((hu - used_intercept) / used_slope).astype(np.int64)
    expected = (stored * used_slope + used_intercept).astype(np.float32)
    if padding_mask is not None:
        assert padding_value is not None
        stored = np.where(padding_mask, padding_value, stored)
        expected = np.where(padding_mask, np.float32(-1024.0), expected).astype(np.float32)
    low, high = (-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1) if signed else (0, (1 << bits_stored) - 1)
    assert stored.min() >= low and stored.max() <= high, "stored values do not fit bits_stored"

    series_uid = series_instance_uid or generate_uid()
    study_uid = study_instance_uid or generate_uid()
    frame_uid = generate_uid()
    rng = random.Random(shuffle_seed)
    instance_numbers = list(range(1, n_slices + 1))
    names = [f"IM{i:04d}{file_suffix}" for i in range(n_slices)]
    if shuffle_seed is not None:
        rng.shuffle(instance_numbers)
        rng.shuffle(names)

    paths: list[Path] = []
    uids: list[str] = []
    for k in range(n_slices):  # k: position order
        ds = _base_dataset(
            sop_class_uid=sop_class_uid,
            modality=modality,
            study_uid=study_uid,
            series_uid=series_uid,
            patient_id=patient_id,
        )
        ds.ImageType = list(image_type)
        ds.FrameOfReferenceUID = frame_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = series_description
        ds.InstanceNumber = instance_numbers[k]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in positions_sorted[k]]
        ds.ImageOrientationPatient = [f"{v:.7f}" for v in orientation]
        ds.PixelSpacing = [f"{v:g}" for v in pixel_spacing_mm]
        if slice_thickness_mm is not None:
            ds.SliceThickness = f"{slice_thickness_mm:g}"
        if slope is not None:
            ds.RescaleSlope = f"{slope:g}"
        if intercept is not None:
            ds.RescaleIntercept = f"{intercept:g}"
        ds.RescaleType = "HU"
        ds.AcquisitionDate = "20240102"
        ds.AcquisitionTime = "101500"
        if padding_value is not None:
            ds.PixelPaddingValue = padding_value
            ds["PixelPaddingValue"].VR = "SS" if signed else "US"
        if padding_range_limit is not None:
            ds.PixelPaddingRangeLimit = padding_range_limit
            ds["PixelPaddingRangeLimit"].VR = "SS" if signed else "US"
        _set_pixels(
            ds,
            stored[k],
            signed=signed,
            bits_allocated=bits_allocated,
            bits_stored=bits_stored,
            transfer_syntax=UID(transfer_syntax),
        )
        if edit is not None:
            edit(ds, k)
        sub = folder / f"d{k % 2}" / f"e{k % 3}" if nested else folder
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / names[k]
        save(ds, path, preamble=preamble)
        paths.append(path)
        uids.append(str(ds.SOPInstanceUID))
    return WrittenSeries(
        series_instance_uid=series_uid,
        study_instance_uid=study_uid,
        paths=tuple(paths),
        sop_instance_uids=tuple(uids),
        image_positions_mm=tuple(positions_sorted),  # type: ignore[arg-type]
        positions_mm=np.sort(projected),
        expected_hu=expected,
        stored=stored,
    )


def write_scout(folder: Path, *, study_instance_uid: str | None = None, n_images: int = 1) -> WrittenSeries:
    """A CT localizer: ImageType LOCALIZER, sagittal-like orientation, 32x16."""
    return write_ct_series(
        folder,
        n_slices=n_images,
        rows=32,
        columns=16,
        orientation=SAGITTAL,
        image_positions_mm=[(float(i), -50.0, 80.0) for i in range(n_images)],
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
        series_number=1,
        series_description="Scout",
        study_instance_uid=study_instance_uid,
        slice_thickness_mm=0.6,
    )


def write_secondary_capture(
    folder: Path, *, study_instance_uid: str | None = None, n_images: int = 6, sop_class: bool = True
) -> WrittenSeries:
    """Screenshots that still say Modality CT (the Philips "Exam Summary"): DERIVED\\SECONDARY,
    and the Secondary Capture SOP class unless ``sop_class`` is False."""
    return write_ct_series(
        folder,
        n_slices=n_images,
        image_type=("DERIVED", "SECONDARY", "DOSE_INFO"),
        sop_class_uid=SecondaryCaptureImageStorage if sop_class else CTImageStorage,
        series_number=401,
        series_description="Exam Summary",
        study_instance_uid=study_instance_uid,
    )


def write_mr_series(folder: Path, *, study_instance_uid: str | None = None, n_slices: int = 6) -> WrittenSeries:
    """An axial MR series: everything right except Modality and SOP class."""
    return write_ct_series(
        folder,
        n_slices=n_slices,
        modality="MR",
        sop_class_uid=MRImageStorage,
        intercept=None,
        slope=None,
        hu=np.full((n_slices, 32, 32), 100.0),
        series_number=5,
        series_description="T2 AX",
        study_instance_uid=study_instance_uid,
    )


def save(ds: Dataset, path: Path, *, preamble: bool = True) -> None:
    """Write ``ds`` as a DICOM file, or without preamble/file meta (a raw implicit-VR data set)."""
    if preamble:
        syntax = UID(ds.file_meta.TransferSyntaxUID)
        if not syntax.is_transfer_syntax:  # private or made up: say how the data set is encoded
            ds.save_as(path, enforce_file_format=True, implicit_vr=False, little_endian=True)
        else:
            ds.save_as(path, enforce_file_format=True)
        return
    raw = Dataset()
    raw.update(ds)
    raw.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=False)


def encode_jpeg_lossless_sv1(values: npt.NDArray[np.integer], *, precision: int) -> bytes:
    """A minimal JPEG lossless (ITU T.81 process 14, predictor 1) codestream, one component.

    ``values``: ``(rows, cols)`` bit patterns in ``[0, 2**precision)``. One Huffman table
    with every difference category (0 to 16) coded in 5 bits; no restart intervals.
    """
    v = np.asarray(values, dtype=np.int64)
    rows, cols = v.shape
    assert v.min() >= 0 and v.max() < (1 << precision)
    pred = np.empty_like(v)
    pred[0, 0] = 1 << (precision - 1)
    pred[0, 1:] = v[0, :-1]
    pred[1:, 0] = v[:-1, 0]
    pred[1:, 1:] = v[1:, :-1]  # selection value 1: the left neighbour
    diff = (v - pred) % 65536
    diff = np.where(diff >= 32768, diff - 65536, diff)

    bits: list[str] = []
    for d in diff.ravel().tolist():
        ssss = 16 if d == -32768 else abs(d).bit_length()
        bits.append(format(ssss, "05b"))
        if 0 < ssss < 16:
            extra = d if d > 0 else (d - 1) & ((1 << ssss) - 1)
            bits.append(format(extra, f"0{ssss}b"))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)
    data = bytearray()
    for i in range(0, len(stream), 8):
        byte = int(stream[i : i + 8], 2)
        data.append(byte)
        if byte == 0xFF:
            data.append(0x00)

    counts = [0] * 16
    counts[4] = 17  # 17 codes of length 5
    dht = bytes([0x00, *counts, *range(17)])
    sof = bytes([precision]) + rows.to_bytes(2, "big") + cols.to_bytes(2, "big") + bytes([1, 1, 0x11, 0])
    sos = bytes([1, 1, 0x00, 1, 0, 0])

    def segment(marker: int, payload: bytes) -> bytes:
        return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload

    return b"\xff\xd8" + segment(0xC4, dht) + segment(0xC3, sof) + segment(0xDA, sos) + bytes(data) + b"\xff\xd9"


def _base_dataset(*, sop_class_uid: str, modality: str, study_uid: str, series_uid: str, patient_id: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = generate_uid()
    ds.StudyDate = "20240102"
    ds.StudyTime = "101010"
    ds.AccessionNumber = "ACC-42"
    ds.Modality = modality
    ds.PatientName = "Doe^Jane"
    ds.PatientID = patient_id
    ds.IssuerOfPatientID = "HOSP"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    return ds


def _set_pixels(
    ds: Dataset,
    stored: npt.NDArray[np.int64],
    *,
    signed: bool,
    bits_allocated: int,
    bits_stored: int,
    transfer_syntax: UID,
) -> None:
    rows, cols = stored.shape
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    dtype = {(8, False): np.uint8, (8, True): np.int8, (16, False): np.uint16, (16, True): np.int16}[
        (bits_allocated, signed)
    ]
    arr = stored.astype(dtype)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta = meta
    if transfer_syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        meta.TransferSyntaxUID = transfer_syntax
        ds.PixelData = arr.tobytes()
        ds["PixelData"].VR = "OW" if bits_allocated > 8 else "OB"
    elif transfer_syntax == JPEGLosslessSV1:
        patterns = stored & ((1 << bits_stored) - 1)  # two's complement bit patterns
        meta.TransferSyntaxUID = transfer_syntax
        ds.PixelData = encapsulate([encode_jpeg_lossless_sv1(patterns, precision=bits_stored)])
        ds["PixelData"].VR = "OB"
    else:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.compress(transfer_syntax, arr)


def set_unchecked(ds: Dataset, keyword: str, value: object) -> None:
    """Set an attribute to a value pydicom would refuse with a warning (e.g. DS 'nan'),
    as broken exporters write them."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        setattr(ds, keyword, value)
