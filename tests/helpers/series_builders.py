"""Build :class:`worker.core.ct.CtSeries` objects for tests: in memory, or from a tiny DICOM series on disk.

Independent of the project's DICOM loader on purpose: these helpers follow the
conventions of :mod:`worker.core.ct` directly (LPS mm, ``(slice, row, column)``, PixelSpacing
order ``(between rows, between columns)``, slices sorted by the position along the normal,
slab thickness = half the gap to each neighbour, end slices their single gap).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from worker.core.ct import CtSeries, SeriesSelection, SeriesSummary, SliceRef, StudyInfo

Vec3 = tuple[float, float, float]

AXIAL: tuple[Vec3, Vec3] = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))
# The GE scan in ../shared/data: gantry tilt 18.5 degrees about the patient x axis.
TILTED: tuple[Vec3, Vec3] = ((1.0, 0.0, 0.0), (0.0, 0.9483237, -0.3173047))
RESCALE_INTERCEPT = -1024.0


def uid(*parts: object) -> str:
    """A deterministic DICOM UID from ``parts`` (same parts, same UID)."""
    return str(generate_uid(entropy_srcs=[str(p) for p in parts]))


def _vec3(values: Sequence[float] | np.ndarray) -> Vec3:
    x, y, z = (float(v) for v in values)
    return (x, y, z)


def normal_of(row_cosine: Vec3, column_cosine: Vec3) -> npt.NDArray[np.float64]:
    n = np.cross(np.asarray(row_cosine, float), np.asarray(column_cosine, float))
    unit: npt.NDArray[np.float64] = n / np.linalg.norm(n)
    return unit


def slab_thickness_mm(positions_mm: Sequence[float] | np.ndarray, *, single_mm: float = 5.0) -> npt.NDArray[np.float64]:
    """Half the gap to each neighbour; end slices their single gap; one slice: ``single_mm``."""
    pos = np.asarray(positions_mm, dtype=np.float64)
    if pos.size == 1:
        return np.array([single_mm])
    gaps = np.diff(pos)
    slabs = np.empty_like(pos)
    slabs[0], slabs[-1] = gaps[0], gaps[-1]
    slabs[1:-1] = (gaps[:-1] + gaps[1:]) / 2.0
    return slabs


def make_ct_series(
    hu: np.ndarray,
    *,
    pixel_spacing_mm: tuple[float, float] = (0.5, 0.5),
    positions_mm: Sequence[float] | None = None,
    slice_gap_mm: float = 5.0,
    orientation: tuple[Vec3, Vec3] = AXIAL,
    origin_mm: Vec3 = (0.0, 0.0, 0.0),
    study_uid: str | None = None,
    series_uid: str | None = None,
) -> CtSeries:
    """A CtSeries in memory around ``hu`` ``(slices, rows, columns)`` HU.

    Slice ``i`` lies at ``positions_mm[i]`` along the normal (default ``i * slice_gap_mm``);
    its ImagePositionPatient is ``origin_mm + positions_mm[i] * normal``.
    """
    hu = np.asarray(hu, dtype=np.float32)
    n = hu.shape[0]
    pos = np.arange(n) * slice_gap_mm if positions_mm is None else np.asarray(positions_mm, float)
    row_cosine, column_cosine = orientation
    normal = normal_of(row_cosine, column_cosine)
    study_uid = study_uid or uid("study", hu.shape)
    series_uid = series_uid or uid("series", hu.shape)
    slices = tuple(
        SliceRef(
            sop_instance_uid=uid(series_uid, i),
            sop_class_uid=str(CTImageStorage),
            path=Path(f"/nonexistent/{i:04d}.dcm"),
            position_mm=float(pos[i]),
            image_position_mm=_vec3(np.asarray(origin_mm) + pos[i] * normal),
            instance_number=i + 1,
        )
        for i in range(n)
    )
    summary = SeriesSummary(series_instance_uid=series_uid, n_files=n, modality="CT", series_number=2)
    return CtSeries(
        study=StudyInfo(study_instance_uid=study_uid),
        series_instance_uid=series_uid,
        hu=hu,
        slices=slices,
        pixel_spacing_mm=pixel_spacing_mm,
        slab_thickness_mm=slab_thickness_mm(pos),
        row_cosine=row_cosine,
        column_cosine=column_cosine,
        slice_thickness_mm=float(slice_gap_mm),
        selection=SeriesSelection(chosen=summary, rejected=()),
    )


def write_dicom_series(
    folder: Path,
    *,
    hu: np.ndarray,
    pixel_spacing_mm: tuple[float, float] = (0.5, 0.5),
    orientation: tuple[Vec3, Vec3] = AXIAL,
    origin_mm: Vec3 = (-16.0, -16.0, 0.0),
    step_mm: Vec3 | None = None,
    slice_thickness_mm: float = 5.0,
    shuffle: bool = True,
    anonymous_patient: bool = False,
) -> list[Path]:
    """Write ``hu`` ``(slices, rows, columns)`` as single-frame CT files; return their paths.

    Slice ``i`` has ImagePositionPatient ``origin_mm + i * step_mm``; ``step_mm`` defaults
    to ``slice_thickness_mm`` along the normal. A gantry-tilted acquisition advances along
    patient z instead (pass e.g. ``(0, 0, 5)`` with :data:`TILTED`). Pixels are int16 with
    RescaleIntercept -1024. ``shuffle`` writes the files in a scrambled instance order so that
    readers must sort. ``anonymous_patient`` omits PatientBirthDate, PatientSex, StudyID and
    friends and uses a single-component PatientName, as anonymised exports do.
    """
    folder.mkdir(parents=True, exist_ok=True)
    hu = np.asarray(hu, dtype=np.float32)
    n, rows, columns = hu.shape
    row_cosine, column_cosine = orientation
    step = (
        normal_of(row_cosine, column_cosine) * slice_thickness_mm
        if step_mm is None
        else np.asarray(step_mm, dtype=np.float64)
    )
    study_uid, series_uid, frame_uid = uid("study", folder), uid("series", folder), uid("frame", folder)
    order = np.random.default_rng(7).permutation(n) if shuffle else np.arange(n)
    paths = []
    for file_index, i in enumerate(order):
        sop_uid = UID(uid(series_uid, int(i)))
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.Modality = "CT"
        ds.Manufacturer = "ichvol-tests"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.SeriesNumber = 2
        ds.InstanceNumber = int(i) + 1
        if anonymous_patient:
            ds.PatientName = "ANONYMOUS"
            ds.PatientID = "ANON"
        else:
            ds.PatientName = "Test^Phantom"
            ds.PatientID = "PHANTOM-1"
            ds.PatientBirthDate = ""
            ds.PatientSex = "O"
            ds.StudyDate = "20240101"
            ds.StudyTime = "120000"
            ds.StudyID = "1"
            ds.AccessionNumber = "ACC1"
            ds.ReferringPhysicianName = ""
        ds.SliceThickness = slice_thickness_mm
        ds.ImageOrientationPatient = [*row_cosine, *column_cosine]
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin_mm) + int(i) * step]
        ds.PixelSpacing = list(pixel_spacing_mm)
        ds.Rows, ds.Columns = rows, columns
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = RESCALE_INTERCEPT
        ds.RescaleSlope = 1.0
        ds.PixelData = np.rint(hu[i] - RESCALE_INTERCEPT).astype("<i2").tobytes()
        path = folder / f"IM{file_index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def ct_series_from_files(
    paths: Sequence[Path], *, stop_before_pixels: bool = False
) -> tuple[CtSeries, list[pydicom.Dataset]]:
    """Read a single-frame series written by :func:`write_dicom_series`, sorted along the normal.

    Returns the CtSeries (HU from the pixel data, or zeros with ``stop_before_pixels``) and
    the datasets in the same sorted order.
    """
    datasets: list[pydicom.Dataset] = [pydicom.dcmread(p, stop_before_pixels=stop_before_pixels) for p in paths]
    iop = [float(v) for v in datasets[0].ImageOrientationPatient]
    row_cosine: Vec3 = (iop[0], iop[1], iop[2])
    column_cosine: Vec3 = (iop[3], iop[4], iop[5])
    normal = normal_of(row_cosine, column_cosine)
    keyed = sorted(
        zip(paths, datasets, strict=True),
        key=lambda pd: float(np.dot(normal, np.asarray(pd[1].ImagePositionPatient, float))),
    )
    sorted_paths = [p for p, _ in keyed]
    sorted_ds = [d for _, d in keyed]
    positions = [float(np.dot(normal, np.asarray(d.ImagePositionPatient, float))) for d in sorted_ds]
    rows, columns = int(sorted_ds[0].Rows), int(sorted_ds[0].Columns)
    if stop_before_pixels:
        hu = np.zeros((len(sorted_ds), rows, columns), dtype=np.float32)
    else:
        hu = np.stack(
            [d.pixel_array.astype(np.float32) * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in sorted_ds]
        )
    spacing = tuple(float(v) for v in sorted_ds[0].PixelSpacing)
    series_uid = str(sorted_ds[0].SeriesInstanceUID)
    slices = tuple(
        SliceRef(
            sop_instance_uid=str(d.SOPInstanceUID),
            sop_class_uid=str(d.SOPClassUID),
            path=p,
            position_mm=pos,
            image_position_mm=_vec3(d.ImagePositionPatient),
            instance_number=int(d.InstanceNumber),
        )
        for p, d, pos in zip(sorted_paths, sorted_ds, positions, strict=True)
    )
    summary = SeriesSummary(series_instance_uid=series_uid, n_files=len(paths), modality="CT")
    series = CtSeries(
        study=StudyInfo(study_instance_uid=str(sorted_ds[0].StudyInstanceUID)),
        series_instance_uid=series_uid,
        hu=hu,
        slices=slices,
        pixel_spacing_mm=(spacing[0], spacing[1]),
        slab_thickness_mm=slab_thickness_mm(positions, single_mm=float(sorted_ds[0].SliceThickness)),
        row_cosine=row_cosine,
        column_cosine=column_cosine,
        slice_thickness_mm=float(sorted_ds[0].SliceThickness),
        selection=SeriesSelection(chosen=summary, rejected=()),
    )
    return series, sorted_ds


def ring_skull_slice(
    *, rows: int = 96, columns: int = 96, radius_px: float = 36.0, wall_px: float = 4.0, gap_px: float = 0.0
) -> npt.NDArray[np.float32]:
    """One slice of a synthetic head: air, 20 HU scalp, a 1000 HU bone ring, 30 HU brain inside.

    ``(rows, columns)`` float32 HU. The ring's inner radius is ``radius_px`` pixels, its wall
    ``wall_px`` thick; ``gap_px > 0`` cuts a straight slot of that width through the ring on
    the +column side (an open skull).
    """
    yy, xx = np.mgrid[:rows, :columns].astype(np.float64)
    cy, cx = (rows - 1) / 2.0, (columns - 1) / 2.0
    r = np.hypot(yy - cy, xx - cx)
    image = np.full((rows, columns), -1000.0, dtype=np.float32)
    image[r <= radius_px + wall_px + 3] = 20.0  # scalp
    ring = (r >= radius_px) & (r <= radius_px + wall_px)
    if gap_px > 0:
        ring &= ~((np.abs(yy - cy) < gap_px / 2.0) & (xx > cx))
    image[ring] = 1000.0
    image[r < radius_px] = 30.0  # brain
    return image
