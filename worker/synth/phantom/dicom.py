"""Writing phantom images as DICOM: CT Image Storage slices, a localizer, a secondary capture.

Pixel storage: ``stored = round((HU - intercept) / slope)``. With a negative intercept that
keeps every stored value >= 0 (e.g. -1024) the data are unsigned, BitsStored 12 when they
fit (HU -1024..3071 at slope 1), else 16; otherwise signed 16-bit. HU are clipped to
-1024..3071 before storage, as scanners do. Compressed transfer syntaxes are lossless and
encoded by pydicom's ``Dataset.compress`` (RLE: pydicom/pylibjpeg-rle, JPEG-LS: pyjpegls,
JPEG 2000: pylibjpeg-openjpeg), so the decoded pixels equal the stored ones exactly.

Every attribute is a function of its inputs (no clock, no random UID): the same phantom
gives the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
)

import worker

HU_MIN = -1024.0
HU_MAX = 3071.0
MANUFACTURER = "ichvol phantom"
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.1.4224"

TRANSFER_SYNTAXES: dict[str, UID] = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "rle": RLELossless,
    "jpegls": JPEGLSLossless,
    "j2k": JPEG2000Lossless,
}


@dataclass(frozen=True)
class StoredFormat:
    """How HU become stored integers: ``HU = stored * slope + intercept``."""

    intercept: float
    slope: float
    pixel_representation: int  # 0 unsigned, 1 two's complement
    bits_stored: int

    @property
    def dtype(self) -> type[np.integer]:
        return np.int16 if self.pixel_representation else np.uint16

    @property
    def stored_range(self) -> tuple[int, int]:
        if self.pixel_representation:
            return (-(1 << (self.bits_stored - 1)), (1 << (self.bits_stored - 1)) - 1)
        return (0, (1 << self.bits_stored) - 1)

    def to_stored(self, hu: npt.NDArray[np.floating]) -> npt.NDArray[np.integer]:
        """HU (any shape) -> stored integers (same shape), rounded half to even, clipped."""
        lo, hi = self.stored_range
        value = np.rint((np.clip(hu, HU_MIN, HU_MAX) - self.intercept) / self.slope)
        out: npt.NDArray[np.integer] = np.clip(value, lo, hi).astype(self.dtype)
        return out

    def to_hu(self, stored: npt.NDArray[np.integer]) -> npt.NDArray[np.float32]:
        return (stored.astype(np.float32) * np.float32(self.slope) + np.float32(self.intercept)).astype(np.float32)


def stored_format(*, intercept: float, slope: float) -> StoredFormat:
    """The smallest standard pixel format holding HU -1024..3071 at this slope and intercept.

    Raises ``ValueError`` when 16 bits cannot hold that range (slope too small).
    """
    if not slope > 0:
        raise ValueError(f"rescale slope must be > 0, got {slope}")
    lo = (HU_MIN - intercept) / slope
    hi = (HU_MAX - intercept) / slope
    if lo >= -0.5:
        for bits in (12, 16):
            if hi <= (1 << bits) - 0.5:
                return StoredFormat(intercept, slope, 0, bits)
    elif lo >= -32768.5 and hi <= 32767.5:
        return StoredFormat(intercept, slope, 1, 16)
    raise ValueError(
        f"rescale slope {slope} and intercept {intercept} cannot store HU {HU_MIN:.0f}..{HU_MAX:.0f} in 16 bits"
    )


@dataclass(frozen=True)
class StudyIdentity:
    """Study- and patient-level attributes shared by every series of one phantom study."""

    study_instance_uid: str
    frame_of_reference_uid: str
    patient_id: str
    patient_name: str
    patient_birth_date: str
    patient_sex: str
    study_date: str
    study_time: str
    accession_number: str
    study_id: str
    study_description: str


@dataclass(frozen=True)
class SeriesHeader:
    series_instance_uid: str
    series_number: int
    series_description: str
    image_type: tuple[str, ...]
    sop_class_uid: str = CTImageStorage
    modality: str = "CT"


@dataclass(frozen=True)
class ImagePlane:
    """Geometry tags of one image: LPS mm, PixelSpacing order (between rows, between columns)."""

    image_position_mm: tuple[float, float, float]
    image_orientation: tuple[float, float, float, float, float, float]
    pixel_spacing_mm: tuple[float, float]
    slice_thickness_mm: float | None
    slice_location_mm: float | None
    gantry_tilt_deg: float = 0.0


def _ds(value: float) -> str:
    """A DS string of at most 16 characters that round-trips the value to ~1e-6 mm."""
    for digits in (10, 9, 8, 7, 6, 5, 4):
        text = f"{value:.{digits}f}".rstrip("0").rstrip(".")
        if text in ("-0", ""):
            text = "0"
        if len(text) <= 16:
            return text
    return f"{value:.6g}"


def build_image(
    *,
    study: StudyIdentity,
    series: SeriesHeader,
    sop_instance_uid: str,
    instance_number: int,
    plane: ImagePlane | None,
    stored: npt.NDArray[np.integer],
    fmt: StoredFormat,
    window: tuple[float, float] = (40.0, 80.0),
    pixel_padding_value: int | None = None,
) -> Dataset:
    """One single-frame greyscale image (``stored`` of shape (rows, columns)) as a Dataset."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(series.sop_class_uid)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    ds.file_meta.ImplementationVersionName = f"ICHVOL_{worker.__version__}"[:16]

    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = list(series.image_type)
    ds.SOPClassUID = UID(series.sop_class_uid)
    ds.SOPInstanceUID = UID(sop_instance_uid)
    ds.StudyDate = study.study_date
    ds.SeriesDate = study.study_date
    ds.ContentDate = study.study_date
    ds.AcquisitionDate = study.study_date
    ds.StudyTime = study.study_time
    ds.SeriesTime = study.study_time
    ds.ContentTime = study.study_time
    ds.AcquisitionTime = study.study_time
    ds.AccessionNumber = study.accession_number
    ds.Modality = series.modality
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "ichvol-phantom"
    ds.SoftwareVersions = worker.__version__
    ds.DeviceSerialNumber = "0"
    ds.InstitutionName = "Synthetic"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = study.study_description
    ds.SeriesDescription = series.series_description
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.patient_birth_date
    ds.PatientSex = study.patient_sex
    ds.PatientIdentityRemoved = "NO"
    ds.BodyPartExamined = "HEAD"
    ds.KVP = "120"
    ds.PatientPosition = "HFS"
    ds.ConvolutionKernel = "SOFT"
    ds.StudyInstanceUID = UID(study.study_instance_uid)
    ds.SeriesInstanceUID = UID(series.series_instance_uid)
    ds.StudyID = study.study_id
    ds.SeriesNumber = series.series_number
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance_number
    ds.FrameOfReferenceUID = UID(study.frame_of_reference_uid)
    ds.PositionReferenceIndicator = ""
    if series.sop_class_uid == SecondaryCaptureImageStorage:
        ds.ConversionType = "WSD"
    if plane is not None:
        ds.ImagePositionPatient = [_ds(v) for v in plane.image_position_mm]
        ds.ImageOrientationPatient = [_ds(v) for v in plane.image_orientation]
        ds.PixelSpacing = [_ds(v) for v in plane.pixel_spacing_mm]
        if plane.slice_thickness_mm is not None:
            ds.SliceThickness = _ds(plane.slice_thickness_mm)
        if plane.slice_location_mm is not None:
            ds.SliceLocation = _ds(plane.slice_location_mm)
        ds.GantryDetectorTilt = _ds(plane.gantry_tilt_deg)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(stored.shape[0]), int(stored.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = fmt.bits_stored
    ds.HighBit = fmt.bits_stored - 1
    ds.PixelRepresentation = fmt.pixel_representation
    if pixel_padding_value is not None:
        ds.add_new(0x00280120, "SS" if fmt.pixel_representation else "US", int(pixel_padding_value))
    ds.WindowCenter = _ds(window[0])
    ds.WindowWidth = _ds(window[1])
    ds.RescaleIntercept = _ds(fmt.intercept)
    ds.RescaleSlope = _ds(fmt.slope)
    ds.RescaleType = "HU"
    ds.PixelData = np.ascontiguousarray(stored, dtype=fmt.dtype).tobytes()
    return ds


def write_image(ds: Dataset, path: Path, *, transfer_syntax: str) -> None:
    """Write ``ds`` to ``path`` in the named transfer syntax (see :data:`TRANSFER_SYNTAXES`)."""
    uid = TRANSFER_SYNTAXES[transfer_syntax]
    if uid.is_compressed:
        dtype = np.int16 if ds.PixelRepresentation else np.uint16
        arr = np.frombuffer(ds.PixelData, dtype=dtype).reshape(ds.Rows, ds.Columns)
        ds.compress(uid, arr, generate_instance_uid=False)
    else:
        ds.file_meta.TransferSyntaxUID = uid
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
