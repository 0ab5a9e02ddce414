"""Value types for one CT study: the series chosen for measurement, on its native grid.

Conventions used across the project
-----------------------------------
* Patient coordinates are DICOM LPS in millimetres (x to the patient's left,
  y to posterior, z to superior).
* A series array has axes ``(slice, row, column)``. Moving one step along ``column``
  moves ``pixel_spacing_mm[1]`` mm along the row direction cosine
  (ImageOrientationPatient[0:3]); one step along ``row`` moves ``pixel_spacing_mm[0]`` mm
  along the column direction cosine (ImageOrientationPatient[3:6]). This is the DICOM
  PixelSpacing order: (spacing between rows, spacing between columns).
* Slices are sorted by ``position_mm``: ImagePositionPatient projected on the slice
  normal ``row_cosine x column_cosine``, ascending. With gantry tilt the slice origins
  are not stacked along the normal; the normal is still the right axis for distances
  between parallel slice planes.
* ``slab_thickness_mm[i]`` is the thickness of the slab slice ``i`` represents along the
  normal: half the gap to each neighbour (end slices: their single gap). A hematoma
  pixel of slice ``i`` stands for ``row_mm * col_mm * slab_thickness_mm[i]`` mm^3.
* Intensities are Hounsfield units (float32).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
MaskArray = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class StudyInfo:
    """Study-level identifiers and times. Patient data: stored, never logged."""

    study_instance_uid: str
    patient_id: str | None = None
    issuer_of_patient_id: str | None = None
    accession_number: str | None = None
    study_date: str | None = None  # DICOM DA, YYYYMMDD
    study_time: str | None = None  # DICOM TM, HHMMSS.FFFFFF
    acquisition_datetime: str | None = None  # DICOM DT of the measured series, when known
    patient_name: str | None = None  # for SEG/SR only; never logged


@dataclass(frozen=True)
class SliceRef:
    """One image of the measured series, in sorted order."""

    sop_instance_uid: str
    sop_class_uid: str
    path: Path
    position_mm: float  # ImagePositionPatient projected on the slice normal
    image_position_mm: tuple[float, float, float]  # ImagePositionPatient (LPS, mm)
    instance_number: int | None = None


@dataclass(frozen=True)
class SeriesSummary:
    """What series selection saw of one series (no pixel data)."""

    series_instance_uid: str
    n_files: int
    modality: str | None = None
    series_description: str | None = None
    series_number: int | None = None
    slice_thickness_mm: float | None = None


@dataclass(frozen=True)
class RejectedSeries:
    """A series that was not measured, with the reason and a stable code."""

    series: SeriesSummary
    code: str
    reason: str


@dataclass(frozen=True)
class SeriesSelection:
    """The outcome of series selection: one chosen series (or none) and every rejection."""

    chosen: SeriesSummary | None
    rejected: tuple[RejectedSeries, ...]


@dataclass
class CtSeries:
    """The measured series: HU voxels on the native grid plus its geometry.

    ``hu`` has shape ``(n_slices, rows, columns)``, float32 HU, slices sorted by
    ``position_mm`` ascending (see the module docstring for conventions).
    """

    study: StudyInfo
    series_instance_uid: str
    hu: FloatArray
    slices: tuple[SliceRef, ...]
    pixel_spacing_mm: tuple[float, float]  # (between rows, between columns)
    slab_thickness_mm: npt.NDArray[np.float64]  # (n_slices,)
    row_cosine: tuple[float, float, float]
    column_cosine: tuple[float, float, float]
    slice_thickness_mm: float | None  # nominal SliceThickness tag, for reference only
    selection: SeriesSelection
    series_description: str | None = None
    warnings: list[str] = field(default_factory=list)
    #: The chosen series' pydicom datasets without pixel data, in sorted order, kept from
    #: reading so that the DICOM SEG/SR writers need not read every file again.
    source_headers: list[Any] | None = field(default=None, repr=False, compare=False)

    @property
    def n_slices(self) -> int:
        return int(self.hu.shape[0])

    @property
    def normal(self) -> npt.NDArray[np.float64]:
        n = np.cross(np.asarray(self.row_cosine, float), np.asarray(self.column_cosine, float))
        normal: npt.NDArray[np.float64] = n / np.linalg.norm(n)
        return normal

    @property
    def positions_mm(self) -> npt.NDArray[np.float64]:
        return np.array([s.position_mm for s in self.slices], dtype=np.float64)

    @property
    def voxel_area_mm2(self) -> float:
        return float(self.pixel_spacing_mm[0] * self.pixel_spacing_mm[1])
