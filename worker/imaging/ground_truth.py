"""A study's reference (ground-truth) hematoma mask, aligned to the measured series' sorted slices.

Evaluation and dataset preparation read a study folder exactly as ``ichvol segment`` does
(:func:`worker.imaging.dicom_load.load_study`) and then need the truth on the same grid:
``(slices, rows, columns)`` uint8 0/1 in the series' sorted order (:mod:`worker.core.ct`).
The truth lies inside the study folder (any depth) in one of these forms; exactly one
must be present:

``truth_mask.npz`` or ``mask.npz``
    ``mask`` ``(k, rows, columns)`` with values 0/1 (or bool) and ``sop_instance_uids``
    ``(k,)``: the SOP Instance UID of each mask slice. This is the phantom generator's
    ``truth/truth_mask.npz`` and the format ``ichvol segment`` writes. Slices are matched
    by UID, so the file's order does not matter; every slice of the measured series must
    be present (extra slices are ignored).

a NIfTI label volume (``*.nii`` or ``*.nii.gz``)
    Non-zero labels are hematoma, or only ``labels`` when given (e.g. ``1 2 4`` for the
    BLAST-CT hemorrhage labels). Alignment uses the file's affine (sform, else qform, as
    nibabel chooses) and the series' DICOM geometry: the centre of every series pixel
    (ImagePositionPatient, the direction cosines and PixelSpacing, LPS mm, turned to RAS)
    is mapped into NIfTI voxel indices. The two grids must coincide: every index must lie
    within ``NIFTI_TOLERANCE_VOXELS`` of an integer and inside the volume, else the file is
    refused (a label map on another grid, or of another series, would need resampling,
    which this project does not do silently). Any axis order or flip that dcm2niix or
    ``ichvol segment``'s ``mask.nii.gz`` uses is handled this way, gantry tilt included.
    An unevenly spaced series is stored in NIfTI with its mean slice step; its slices are
    then matched by order, provided the NIfTI holds exactly as many planes and the first
    and last slices coincide.

a DICOM Segmentation (SEG)
    Any DICOM file whose SOP Class is Segmentation Storage. Frames are mapped to the
    series' SOP instances through their source-image references (highdicom); slices
    without a frame are empty. All segments are united, or only segment numbers
    ``labels``; fractional segments count where the fraction is at least 0.5.

Problems raise :class:`worker.core.errors.StudyError` with one line naming the file.
"""

from __future__ import annotations

import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from worker.core.ct import CtSeries, MaskArray
from worker.core.errors import ErrorCode, StudyError

__all__ = [
    "NIFTI_TOLERANCE_VOXELS",
    "TruthSource",
    "find_truth_source",
    "load_truth_mask",
]

NPZ_NAMES = ("truth_mask.npz", "mask.npz")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
SEG_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.4"
NIFTI_TOLERANCE_VOXELS = 0.1
MAX_TRUTH_VOXELS = 2048 * 2048 * 2000

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class TruthSource:
    """Where a study's truth mask is: ``kind`` is ``"npz"``, ``"nifti"`` or ``"seg"``."""

    kind: str
    path: Path


def _truth_error(code: ErrorCode, path: Path, root: Path, message: str) -> StudyError:
    try:
        label = str(path.relative_to(root))
    except ValueError:
        label = path.name
    return StudyError(code, f"{label}: {message}")


def _is_seg(path: Path) -> bool:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except Exception:
        return False
    return str(getattr(ds, "SOPClassUID", "")) == SEG_SOP_CLASS_UID


def find_truth_source(study_dir: Path) -> TruthSource:
    """The one truth file of a study folder (forms: module docstring).

    Raises :class:`StudyError` when there is none, or more than one.
    """
    root = Path(study_dir)
    found: list[TruthSource] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        name = path.name.lower()
        if name in NPZ_NAMES:
            found.append(TruthSource("npz", path))
        elif name.endswith(NIFTI_SUFFIXES):
            found.append(TruthSource("nifti", path))
        elif not name.endswith((".json", ".txt", ".csv", ".png", ".jpg", ".npz", ".md")) and _is_seg(path):
            found.append(TruthSource("seg", path))
    if not found:
        raise StudyError(
            ErrorCode.MISSING_TRUTH,
            f"{root.name}: no ground-truth mask (truth_mask.npz, mask.npz, a NIfTI label volume or a DICOM SEG) "
            "in the study folder",
        )
    if len(found) > 1:
        names = ", ".join(str(s.path.relative_to(root)) for s in found[:4])
        raise StudyError(
            ErrorCode.MISSING_TRUTH,
            f"{root.name}: more than one ground-truth file ({names}); keep exactly one per study",
        )
    return found[0]


def load_truth_mask(
    study_dir: Path,
    series: CtSeries,
    *,
    labels: Sequence[int] | None = None,
    source: TruthSource | None = None,
) -> MaskArray:
    """The truth mask of ``series`` ``(slices, rows, columns)`` uint8 0/1, in its sorted order.

    ``study_dir`` is searched with :func:`find_truth_source` unless ``source`` is given;
    ``labels`` selects NIfTI label values or SEG segment numbers (default: all non-zero).
    """
    root = Path(study_dir)
    source = source or find_truth_source(root)
    if source.kind == "npz":
        return _from_npz(source.path, series, root)
    if source.kind == "nifti":
        return _from_nifti(source.path, series, root, labels)
    if source.kind == "seg":
        return _from_seg(source.path, series, root, labels)
    raise ValueError(f"unknown truth kind {source.kind!r}")


# --- npz -------------------------------------------------------------------------------------


def _npy_header(archive: zipfile.ZipFile, member: str) -> tuple[tuple[int, ...], np.dtype[Any]]:
    with archive.open(member) as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, _fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    return tuple(int(s) for s in shape), np.dtype(dtype)


def _from_npz(path: Path, series: CtSeries, root: Path) -> MaskArray:
    rows, columns = series.hu.shape[1:]
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if "mask.npy" not in names or "sop_instance_uids.npy" not in names:
                raise _truth_error(
                    ErrorCode.CORRUPT_PIXEL_DATA, path, root, "needs the arrays 'mask' and 'sop_instance_uids'"
                )
            shape, dtype = _npy_header(archive, "mask.npy")
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        raise _truth_error(ErrorCode.CORRUPT_PIXEL_DATA, path, root, f"is not a readable .npz file ({exc})") from None
    if len(shape) != 3 or shape[1:] != (rows, columns):
        raise _truth_error(
            ErrorCode.INCONSISTENT_GEOMETRY,
            path,
            root,
            f"mask has shape {shape}, the series has {rows}x{columns} pixels per slice",
        )
    if int(np.prod(shape)) > MAX_TRUTH_VOXELS:
        raise _truth_error(ErrorCode.TOO_LARGE, path, root, f"mask of shape {shape} is too large")
    if dtype.kind not in "biu":
        raise _truth_error(
            ErrorCode.CORRUPT_PIXEL_DATA, path, root, f"mask has dtype {dtype}, expected integers or bool"
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            mask = np.asarray(data["mask"])
            uids = [str(u) for u in np.asarray(data["sop_instance_uids"]).ravel()]
    except (OSError, ValueError, KeyError) as exc:
        raise _truth_error(ErrorCode.CORRUPT_PIXEL_DATA, path, root, f"cannot be read ({exc})") from None
    if len(uids) != mask.shape[0]:
        raise _truth_error(
            ErrorCode.INCONSISTENT_GEOMETRY,
            path,
            root,
            f"{len(uids)} SOP instance UIDs for {mask.shape[0]} mask slices",
        )
    values = np.unique(mask)
    if not np.all(np.isin(values, (0, 1))):
        raise _truth_error(
            ErrorCode.CORRUPT_PIXEL_DATA,
            path,
            root,
            f"mask is not binary (values {values[:6].tolist()}); store 0 and 1",
        )
    index = {uid: i for i, uid in enumerate(uids)}
    missing = [ref.sop_instance_uid for ref in series.slices if ref.sop_instance_uid not in index]
    if missing:
        raise _truth_error(
            ErrorCode.INCONSISTENT_GEOMETRY,
            path,
            root,
            f"has no mask for {len(missing)} of the {series.n_slices} slices of the measured series "
            "(SOP instance UIDs differ: a mask of another series?)",
        )
    order = [index[ref.sop_instance_uid] for ref in series.slices]
    out: MaskArray = mask[order].astype(np.uint8)
    return out


# --- NIfTI -----------------------------------------------------------------------------------


def _from_nifti(path: Path, series: CtSeries, root: Path, labels: Sequence[int] | None) -> MaskArray:
    import nibabel as nib

    try:
        image: Any = nib.load(path)  # header only; data stay on disk until asked for
        shape = tuple(int(s) for s in image.shape)
        affine = np.asarray(image.affine, dtype=np.float64)
    except Exception as exc:
        raise _truth_error(ErrorCode.CORRUPT_PIXEL_DATA, path, root, f"is not a readable NIfTI file ({exc})") from None
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise _truth_error(
            ErrorCode.INCONSISTENT_GEOMETRY, path, root, f"is {len(shape)}-D {shape}, expected a 3-D label volume"
        )
    if int(np.prod(shape)) > MAX_TRUTH_VOXELS:
        raise _truth_error(ErrorCode.TOO_LARGE, path, root, f"label volume of shape {shape} is too large")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise _truth_error(ErrorCode.INVALID_GEOMETRY, path, root, "has a singular or non-finite affine")
    inverse = np.asarray(np.linalg.inv(affine), dtype=np.float64)
    idx = _nifti_voxels(_series_to_nifti_indices(series, inverse), shape, path, root)
    try:
        data = np.asarray(image.dataobj).reshape(shape)
    except Exception as exc:
        raise _truth_error(ErrorCode.CORRUPT_PIXEL_DATA, path, root, f"label data cannot be read ({exc})") from None
    if data.dtype.kind == "f" and (not np.all(np.isfinite(data)) or not np.array_equal(data, np.rint(data))):
        raise _truth_error(ErrorCode.CORRUPT_PIXEL_DATA, path, root, "holds non-integer labels; expected a label map")
    chosen = data != 0 if labels is None else np.isin(data, np.asarray(list(labels)))
    out: MaskArray = chosen[idx[0], idx[1], idx[2]].astype(np.uint8)
    return out


def _nifti_voxels(
    index: npt.NDArray[np.float64], shape: tuple[int, ...], path: Path, root: Path
) -> npt.NDArray[np.int64]:
    """Integer NIfTI voxels ``(3, slices, rows, columns)`` of the series pixels, or a clear refusal.

    In-plane the grids must coincide within the tolerance. Along the slice axis (the NIfTI
    axis that stays constant within each series slice) an unevenly spaced series is stored
    with its mean step (dcm2niix, ``ichvol segment``): the first and last slices coincide and
    the others fall between planes. There series slices are matched to NIfTI planes by
    order, when the NIfTI holds exactly as many planes, the end slices coincide and the
    order is monotonic.
    """
    n = index.shape[1]
    spread = (index.max(axis=(2, 3)) - index.min(axis=(2, 3))).max(axis=1)  # within-slice, per axis
    slice_axis = int(np.argmin(spread)) if index.shape[2] * index.shape[3] > 1 else 2
    deviation = np.abs(index - np.rint(index)).reshape(3, -1).max(axis=1)
    in_plane = [a for a in range(3) if a != slice_axis]
    worst = float(deviation[in_plane].max())
    if worst > NIFTI_TOLERANCE_VOXELS or spread[slice_axis] > 2 * NIFTI_TOLERANCE_VOXELS:
        raise _truth_error(
            ErrorCode.INCONSISTENT_GEOMETRY,
            path,
            root,
            f"its voxel grid does not coincide with the series' pixels (off by up to "
            f"{max(worst, float(spread[slice_axis])):.2f} voxel); export the labels on the CT series' own grid",
        )
    idx = np.rint(index).astype(np.int64)
    if deviation[slice_axis] > NIFTI_TOLERANCE_VOXELS:
        k = index[slice_axis].mean(axis=(1, 2))
        steps = np.diff(k)
        ends = np.array([k[0], k[-1]])
        ends_ok = bool(np.all(np.abs(ends - np.rint(ends)) <= NIFTI_TOLERANCE_VOXELS))
        monotonic = bool(np.all(steps > 0) or np.all(steps < 0))
        planes = np.arange(n) if n < 2 or steps[0] > 0 else np.arange(n)[::-1]
        if shape[slice_axis] != n or not monotonic or not ends_ok or int(np.rint(k[0])) != planes[0]:
            raise _truth_error(
                ErrorCode.INCONSISTENT_GEOMETRY,
                path,
                root,
                f"its slices do not coincide with the series' slices (off by up to {deviation[slice_axis]:.2f} "
                "slice); export the labels on the CT series' own grid",
            )
        idx[slice_axis] = planes[:, None, None]
    for axis in range(3):
        if idx[axis].min() < 0 or idx[axis].max() >= shape[axis]:
            raise _truth_error(
                ErrorCode.INCONSISTENT_GEOMETRY,
                path,
                root,
                f"does not cover the series: the series reaches voxel index {int(idx[axis].min())}.."
                f"{int(idx[axis].max())} on NIfTI axis {axis}, the volume has {shape[axis]}",
            )
    return idx


def _series_to_nifti_indices(series: CtSeries, inverse: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """NIfTI voxel indices ``(3, slices, rows, columns)`` of every series pixel centre."""
    n, rows, columns = series.hu.shape
    row_mm, col_mm = series.pixel_spacing_mm
    rot = inverse[:3, :3] @ _LPS_TO_RAS
    step_col = rot @ (np.asarray(series.row_cosine) * col_mm)  # one column to the right
    step_row = rot @ (np.asarray(series.column_cosine) * row_mm)  # one row down
    origins = np.array([rot @ np.asarray(s.image_position_mm) for s in series.slices]) + inverse[:3, 3]
    j = np.arange(rows, dtype=np.float64)[:, None]
    i = np.arange(columns, dtype=np.float64)[None, :]
    out = np.empty((3, n, rows, columns), dtype=np.float64)
    for axis in range(3):
        out[axis] = origins[:, axis, None, None] + (j * step_row[axis] + i * step_col[axis])[None]
    return out


# --- DICOM SEG -------------------------------------------------------------------------------


def _from_seg(path: Path, series: CtSeries, root: Path, labels: Sequence[int] | None) -> MaskArray:
    import highdicom as hd

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            seg: Any = hd.seg.segread(path)
    except Exception as exc:
        raise _truth_error(ErrorCode.CORRUPT_PIXEL_DATA, path, root, f"is not a readable DICOM SEG ({exc})") from None
    referenced = {str(uid[2]) for uid in seg.get_source_image_uids()}
    uids = [ref.sop_instance_uid for ref in series.slices]
    if not referenced.intersection(uids):
        raise _truth_error(
            ErrorCode.INCONSISTENT_GEOMETRY, path, root, "references none of the measured series' images"
        )
    numbers = list(seg.get_segment_numbers())
    wanted = numbers if labels is None else [int(x) for x in labels if int(x) in numbers]
    if not wanted:
        raise _truth_error(
            ErrorCode.INCONSISTENT_GEOMETRY, path, root, f"has no segment numbered {list(labels or [])} (has {numbers})"
        )
    present = [uid for uid in uids if uid in referenced]
    rows, columns = series.hu.shape[1:]
    out = np.zeros((len(uids), rows, columns), dtype=np.uint8)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixels = np.asarray(
                seg.get_pixels_by_source_instance(
                    source_sop_instance_uids=present,
                    segment_numbers=wanted,
                    assert_missing_frames_are_empty=True,
                    dtype=np.float32,
                )
            )
    except Exception as exc:
        raise _truth_error(ErrorCode.CORRUPT_PIXEL_DATA, path, root, f"frames cannot be read ({exc})") from None
    if pixels.shape[1:3] != (rows, columns):
        raise _truth_error(
            ErrorCode.INCONSISTENT_GEOMETRY,
            path,
            root,
            f"frames are {pixels.shape[1]}x{pixels.shape[2]}, the series is {rows}x{columns}",
        )
    position = {uid: k for k, uid in enumerate(uids)}
    union: npt.NDArray[np.bool_] = np.asarray(np.asarray(pixels >= 0.5).any(axis=3), dtype=bool)
    for n, uid in enumerate(present):
        out[position[uid]] = union[n]
    return out
