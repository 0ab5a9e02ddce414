"""The study's mask artefacts: ``mask.npz``, ``mask.nii.gz`` and a DICOM SEG ``seg.dcm``.

Every writer takes the final hematoma mask as ``(slices, rows, columns)`` (non-zero =
hematoma) in the sorted slice order of :class:`worker.core.ct.CtSeries`, and writes values 0/1.
Files are written to a temporary name beside ``path`` and renamed into place, so a reader
never sees half a file and a retried run overwrites cleanly.

mask.npz
    ``mask``: uint8 ``(slices, rows, columns)`` in sorted order; ``sop_instance_uids``:
    ``(slices,)`` unicode strings, the SOP Instance UID of each slice. Loads with
    ``np.load(path, allow_pickle=False)``.

mask.nii.gz
    The data array is the mask transposed to ``(column, row, slice)``: NIfTI index ``i`` is
    the column index, ``j`` the row index, ``k`` the slice index (the convention of
    ``nifti_affine``), uint8, gzip. The 4x4 affine maps ``(i, j, k, 1)`` to RAS+ mm and is
    written as the sform with code 1 (scanner). The qform (rotation + zooms only, no shear)
    is written with code 1 when the affine's columns are orthogonal; a gantry-tilted series
    has a sheared affine that a qform cannot hold, so there the qform code is 0 (unknown)
    and readers use the exact sform (nibabel, FSL, ANTs/ITK with sform support do).

seg.dcm
    A binary DICOM Segmentation (highdicom) with one segment, "Hematoma":
    category Morphologically Abnormal Structure (SCT 49755003), type Hematoma
    (SCT 35566002), anatomic region Brain (SCT 12738006), algorithm type AUTOMATIC with the
    model's name and version (family Artificial Intelligence, DCM 123110). Series
    description "ICH mask (research use only)". Each non-empty frame references its source
    CT instance; empty frames are omitted. An all-empty mask (the usual case) is written as
    a valid SEG with a single all-zero frame at the first slice's plane, still referencing
    every source instance: it says "nothing found" explicitly. (highdicom would otherwise
    fall back to writing every empty frame: 0.9 MB for 28 slices of 512 x 512 instead of
    40 kB.) Readers that ask for the frames of all source instances with
    ``assert_missing_frames_are_empty=True`` get an all-zero mask either way.
    ``source_images`` may be header-only (``stop_before_pixels=True``): highdicom needs no
    pixel data, only the geometry, the UIDs and the patient/study module. Type 2 patient
    and study attributes missing from the CT headers (seen in anonymised exports) are
    written empty.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import nibabel as nib
import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.sr.codedict import codes

import worker
from worker.core.ct import MaskArray
from worker.core.errors import ErrorCode, StudyError
from worker.core.notices import DISCLAIMER

__all__ = [
    "SEG_SERIES_DESCRIPTION",
    "SegmentClass",
    "write_class_seg",
    "write_mask_nifti",
    "write_mask_npz",
    "write_seg",
]

SEG_SERIES_DESCRIPTION = "ICH mask (research use only)"
SEGMENT_LABEL = "Hematoma"
MANUFACTURER = "ichvol"

# Type 2 attributes highdicom copies from the first source image (they must exist, may be empty).
_TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)
# What the SEG needs from every source image to place and reference its frames.
_REQUIRED_PER_IMAGE = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
)


def _binary_uint8(mask: np.ndarray) -> MaskArray:
    if mask.ndim != 3:
        raise ValueError(f"mask must have shape (slices, rows, columns), got shape {mask.shape}")
    binary: MaskArray = (np.asarray(mask) != 0).astype(np.uint8)
    return binary


def _label_uint8(mask: np.ndarray) -> MaskArray:
    if mask.ndim != 3:
        raise ValueError(f"mask must have shape (slices, rows, columns), got shape {mask.shape}")
    values = np.asarray(mask)
    if values.size and (values.min() < 0 or values.max() > 255):
        raise ValueError("a label map must hold values 0..255")
    labelled: MaskArray = values.astype(np.uint8)
    return labelled


@contextlib.contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path``, renamed onto it when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; artefacts are meant to be read
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_mask_npz(
    path: Path, *, mask: np.ndarray, sop_instance_uids: Sequence[str], extra: Mapping[str, np.ndarray] | None = None
) -> None:
    """Write ``mask.npz``: ``mask`` uint8 ``(slices, rows, columns)`` and ``sop_instance_uids``.

    ``sop_instance_uids[i]`` is the SOP Instance UID of slice ``i`` (sorted order).
    ``extra``: more named arrays stored as given (``ichvol teacher``: ``labels``, the class of
    every voxel, and ``hemorrhage_probability``); they may not be named ``mask`` or
    ``sop_instance_uids``.
    """
    data = _binary_uint8(mask)
    more = {str(k): np.asarray(v) for k, v in (extra or {}).items()}
    if {"mask", "sop_instance_uids"} & set(more):
        raise ValueError("extra arrays may not replace mask or sop_instance_uids")
    uids = [str(u) for u in sop_instance_uids]
    if len(uids) != data.shape[0]:
        raise ValueError(f"{len(uids)} SOP instance UIDs for a mask of {data.shape[0]} slices")
    uid_array = np.array(uids, dtype=f"<U{max((len(u) for u in uids), default=1)}")
    with _atomic_path(path) as tmp, tmp.open("wb") as fh:
        # A file object: numpy would append ".npz" to a path that lacks it.
        np.savez_compressed(fh, mask=data, sop_instance_uids=uid_array, **more)  # type: ignore[arg-type]


def _has_shear(affine: npt.NDArray[np.float64]) -> bool:
    columns = affine[:3, :3]
    norms = np.linalg.norm(columns, axis=0)
    unit = columns / norms
    gram = unit.T @ unit
    return bool(np.max(np.abs(gram - np.eye(3))) > 1e-4)


def write_mask_nifti(
    path: Path, *, mask: np.ndarray, affine: np.ndarray, labels: bool = False, description: str | None = None
) -> None:
    """Write ``mask.nii.gz``: uint8 data ``(column, row, slice)`` with the 4x4 RAS ``affine``.

    ``mask`` is ``(slices, rows, columns)``; ``affine`` maps NIfTI ``(i, j, k)`` =
    (column, row, slice index) to RAS+ mm. sform code 1; qform code 1, or 0 where the
    affine is sheared (gantry tilt; see the module docstring). ``labels``: keep the values
    (a label map, 0..255) instead of 0/1; ``description``: the header's descrip (80 bytes).
    """
    data = _binary_uint8(mask) if not labels else _label_uint8(mask)
    matrix = np.asarray(affine, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        raise ValueError(f"affine must be a finite 4x4 matrix, got shape {matrix.shape}")
    if not np.allclose(matrix[3], [0.0, 0.0, 0.0, 1.0]):
        raise ValueError(f"affine's last row must be [0, 0, 0, 1], got {matrix[3].tolist()}")
    if np.any(np.linalg.norm(matrix[:3, :3], axis=0) == 0) or abs(np.linalg.det(matrix[:3, :3])) < 1e-12:
        raise ValueError("affine is singular: a voxel axis has no length or two axes are parallel")
    volume = np.ascontiguousarray(data.transpose(2, 1, 0))
    nifti: Any = nib  # nibabel has no type hints
    header = nifti.Nifti1Header()
    header.set_data_dtype(np.uint8)
    image = nifti.Nifti1Image(volume, matrix, header=header)
    image.set_sform(matrix, code=1)
    # set_qform silently keeps the nearest rotation of a sheared matrix: mark it unusable there.
    image.set_qform(matrix, code=0 if _has_shear(matrix) else 1)
    image.header.set_xyzt_units(xyz="mm")
    text = description or "ichvol hematoma mask; research use only"
    image.header["descrip"] = np.bytes_(text.encode("ascii", "replace")[:79])
    # gzip with a fixed timestamp: identical masks give identical files.
    payload = gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)
    with _atomic_path(path) as tmp:
        tmp.write_bytes(payload)


def _check_source_images(source_images: Sequence[pydicom.Dataset], data: MaskArray) -> None:
    if len(source_images) != data.shape[0]:
        raise ValueError(f"{len(source_images)} source images for a mask of {data.shape[0]} slices")
    for index, ds in enumerate(source_images):
        missing = [kw for kw in _REQUIRED_PER_IMAGE if kw not in ds or ds[kw].value in (None, "", [])]
        if missing:
            raise StudyError(
                ErrorCode.MISSING_GEOMETRY,
                f"Image {index + 1} of the series lacks {', '.join(missing)}, needed to place the "
                "segmentation; re-export the series with complete DICOM headers.",
            )
        if (int(ds.Rows), int(ds.Columns)) != data.shape[1:]:
            raise ValueError(
                f"source image {index + 1} is {ds.Rows}x{ds.Columns}, the mask slices are "
                f"{data.shape[1]}x{data.shape[2]}"
            )


def _unknown_charset(ds: pydicom.Dataset) -> bool:
    from pydicom.charset import python_encoding

    terms = ds.get("SpecificCharacterSet") or []
    if isinstance(terms, str):
        terms = [terms]
    return any(str(term).strip() and str(term).strip() not in python_encoding for term in terms)


def _with_type2_attributes(ds: pydicom.Dataset) -> pydicom.Dataset:
    """``ds`` itself if the SEG can copy its patient/study attributes as they are, else a copy.

    The copy has every missing Type 2 patient/study attribute (empty) and, where
    SpecificCharacterSet names an encoding no one knows, Latin-1 (ISO_IR 100) instead: it
    maps every byte, so names survive byte for byte rather than failing the whole SEG.
    """
    missing = [kw for kw in _TYPE2_PATIENT_STUDY if kw not in ds]
    bad_charset = _unknown_charset(ds)
    if not missing and not bad_charset:
        return ds
    # A new top-level dataset sharing the elements (pixel data is not copied); copy.copy of a
    # pydicom Dataset would share its element dictionary and modify the caller's dataset.
    header = pydicom.Dataset()
    for element in ds:
        header.add(element)
    if hasattr(ds, "file_meta"):
        header.file_meta = ds.file_meta
    for keyword in missing:
        setattr(header, keyword, None)
    if bad_charset:  # a new element: the copy shares the caller's element objects
        header["SpecificCharacterSet"] = pydicom.DataElement(0x00080005, "CS", "ISO_IR 100")
    return header


def _plane_position(ds: pydicom.Dataset) -> hd.PlanePositionSequence:
    return hd.PlanePositionSequence(
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        image_position=[float(v) for v in ds.ImagePositionPatient],
    )


@dataclass(frozen=True)
class SegmentClass:
    """One segment of a multi-class SEG: the label value it covers, its label and SNOMED type."""

    value: int
    label: str
    property_type: Any  # a pydicom/highdicom Code (SCT)


def write_seg(
    path: Path,
    *,
    mask: np.ndarray,
    source_images: Sequence[pydicom.Dataset],
    model_name: str,
    model_version: str,
    series_number: int = 901,
) -> None:
    """Write the mask as a binary DICOM SEG referencing the measured CT series.

    ``mask``: ``(slices, rows, columns)``, non-zero = hematoma; ``source_images``: that
    series' datasets (header-only is enough) in the same sorted order, one per slice.
    ``model_name``/``model_version`` go into the segment's AlgorithmIdentificationSequence.
    Raises :class:`StudyError` where the CT headers lack what a SEG needs.
    """
    _write_seg(
        path,
        labels=_binary_uint8(mask),
        classes=(SegmentClass(1, SEGMENT_LABEL, codes.SCT.Hematoma),),
        source_images=source_images,
        model_name=model_name,
        model_version=model_version,
        series_number=series_number,
        series_description=SEG_SERIES_DESCRIPTION,
    )


def write_class_seg(
    path: Path,
    *,
    labels: np.ndarray,
    classes: Sequence[SegmentClass],
    source_images: Sequence[pydicom.Dataset],
    model_name: str,
    model_version: str,
    series_number: int = 902,
    series_description: str = SEG_SERIES_DESCRIPTION,
) -> None:
    """Write a label map as a binary DICOM SEG with one segment per class (``ichvol teacher``).

    ``labels``: ``(slices, rows, columns)`` integer classes; every value that is not the
    ``value`` of one of ``classes`` counts as background. Segment ``i + 1`` is ``classes[i]``.
    Otherwise as :func:`write_seg`.
    """
    values = _label_uint8(labels)
    numbered = np.zeros_like(values)
    for number, cls in enumerate(classes, start=1):
        numbered[values == cls.value] = number
    _write_seg(
        path,
        labels=numbered,
        classes=classes,
        source_images=source_images,
        model_name=model_name,
        model_version=model_version,
        series_number=series_number,
        series_description=series_description,
    )


def _write_seg(
    path: Path,
    *,
    labels: MaskArray,
    classes: Sequence[SegmentClass],
    source_images: Sequence[pydicom.Dataset],
    model_name: str,
    model_version: str,
    series_number: int,
    series_description: str,
) -> None:
    """``labels`` holds segment numbers (0: none, ``i + 1``: ``classes[i]``)."""
    data = labels
    _check_source_images(source_images, data)
    sources = [_with_type2_attributes(source_images[0]), *source_images[1:]]
    any_hematoma = bool(data.any())
    algorithm = hd.AlgorithmIdentificationSequence(
        name=model_name,
        version=model_version,
        family=codes.cid7162.ArtificialIntelligence,
    )
    segments = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=cls.label,
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=cls.property_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            anatomic_regions=[codes.SCT.Brain],
        )
        for number, cls in enumerate(classes, start=1)
    ]
    try:
        with warnings.catch_warnings():
            # Anonymised exports often hold single-component names ("ANONYMOUS"); highdicom
            # warns about them but copies them unchanged, which is what we want.
            warnings.filterwarnings("ignore", message=r".*unlikely to represent the intended person name")
            seg = hd.seg.Segmentation(
                source_images=sources,
                pixel_array=data if any_hematoma else data[:1],
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=segments,
                series_instance_uid=hd.UID(),
                series_number=series_number,
                sop_instance_uid=hd.UID(),
                instance_number=1,
                manufacturer=MANUFACTURER,
                manufacturer_model_name=f"{MANUFACTURER} {model_name}"[:64],
                software_versions=worker.__version__,
                device_serial_number="0",
                content_label="ICH",
                content_description=DISCLAIMER,
                plane_positions=None if any_hematoma else [_plane_position(source_images[0])],
                omit_empty_frames=any_hematoma,
            )
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        raise StudyError(
            ErrorCode.INVALID_GEOMETRY,
            f"The DICOM segmentation could not be built from this series' headers ({exc}); "
            "check the series' geometry tags.",
        ) from exc
    seg.SeriesDescription = series_description
    with _atomic_path(path) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
