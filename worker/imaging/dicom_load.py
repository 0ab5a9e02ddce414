"""Load a study folder into the one :class:`worker.core.ct.CtSeries` to measure.

Headers first: :func:`worker.imaging.dicom_files.scan_study` reads every header (no pixels),
:func:`worker.imaging.series_selection.select_series` picks the series and checks every limit,
and only then is the HU volume allocated and each chosen slice read once, decoded and
converted (:func:`worker.imaging.hu.to_hu`).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from worker.core.ct import CtSeries, SliceRef, StudyInfo
from worker.core.errors import ErrorCode, StudyError
from worker.imaging import geometry
from worker.imaging.dicom_files import (
    invalid_uid_warning,
    invalid_uids,
    must_propagate,
    quiet_pydicom,
    read_dataset,
    scan_study,
)
from worker.imaging.hu import to_hu
from worker.imaging.series_selection import SelectionRules, UsableSeries, select_series

logger = logging.getLogger(__name__)


def load_study(study_dir: Path, *, rules: SelectionRules) -> CtSeries:
    """Read ``study_dir`` (any nesting, any file names) and return the series to measure.

    The result holds float32 HU of shape ``(slices, rows, columns)``, slices sorted by
    ImagePositionPatient projected on the slice normal (ascending), per-slice slab
    thicknesses (mm) along the normal, the selection record and study identifiers; see
    :mod:`worker.core.ct` for the conventions. Raises :class:`worker.core.errors.StudyError` with a
    specific code for every unusable input, :class:`worker.core.errors.TransientError` for I/O
    errors.
    """
    started = time.perf_counter()
    files = scan_study(study_dir, max_files=rules.max_files)
    outcome = select_series(files.headers, rules=rules)
    chosen = outcome.chosen
    warnings = [*files.warnings, *chosen.warnings]

    n = len(chosen.headers)
    # Allocation only after selection checked rows*columns and the slice count.
    hu = np.empty((n, chosen.rows, chosen.columns), dtype=np.float32)
    study: StudyInfo | None = None
    headers: list[Dataset] = []
    bad_uids: dict[str, list[str]] = {}
    for i, header in enumerate(chosen.headers):
        label = _relative(header.path, files.root)
        ds = read_dataset(header.path, forced=header.forced)
        has_float_pixels = "FloatPixelData" in ds or "DoubleFloatPixelData" in ds
        if ("PixelData" not in ds and header.has_pixel_data and not has_float_pixels) or _pixel_data_cut_short(ds):
            # The scan saw the Pixel Data tag; pydicom drops an element the file ends inside
            # (encapsulated data cut short) and keeps a native one shorter than its declared length.
            raise StudyError(ErrorCode.TRUNCATED_FILE, f"{label} is truncated: the file ends inside its pixel data")
        # Values are converted on access (names, dates): keep pydicom's warnings, which quote
        # them, out of the logs.
        with quiet_pydicom():
            if study is None:
                study = study_info(ds)
            slice_hu = to_hu(ds, label=label)
            for keyword, value in invalid_uids(ds).items():
                bad_uids.setdefault(keyword, []).append(value)
        if slice_hu.shape != (chosen.rows, chosen.columns):
            raise StudyError(
                ErrorCode.INCONSISTENT_GEOMETRY,
                f"{label} is {slice_hu.shape[0]}x{slice_hu.shape[1]} pixels, "
                f"the series is {chosen.rows}x{chosen.columns}",
            )
        hu[i] = slice_hu
        if "PixelData" in ds:
            del ds.PixelData  # also drops pydicom's decoded copy; the header stays for SEG/SR
        headers.append(ds)
    assert study is not None  # selection guarantees at least one slice

    uid_warning = invalid_uid_warning(bad_uids, n_images=n)
    if uid_warning is not None:
        warnings.append(uid_warning)
    slabs = _slab_thicknesses(chosen, warnings)
    uneven = geometry.uneven_spacing_warning(np.asarray(chosen.positions_mm))
    if uneven is not None:
        warnings.append(uneven)

    slices = tuple(
        SliceRef(
            sop_instance_uid=h.sop_instance_uid,
            sop_class_uid=h.sop_class_uid,
            path=h.path,
            position_mm=position,
            image_position_mm=_position(h.image_position_mm),
            instance_number=h.instance_number,
        )
        for h, position in zip(chosen.headers, chosen.positions_mm, strict=True)
    )
    logger.info(
        "loaded series: %d slices of %dx%d, tilt %.1f deg, %d series rejected, %.2f s",
        n,
        chosen.rows,
        chosen.columns,
        chosen.tilt_deg,
        len(outcome.selection.rejected),
        time.perf_counter() - started,
    )
    return CtSeries(
        study=study,
        series_instance_uid=chosen.summary.series_instance_uid,
        hu=hu,
        slices=slices,
        pixel_spacing_mm=chosen.pixel_spacing_mm,
        slab_thickness_mm=slabs,
        row_cosine=chosen.row_cosine,
        column_cosine=chosen.column_cosine,
        slice_thickness_mm=chosen.summary.slice_thickness_mm,
        selection=outcome.selection,
        series_description=chosen.summary.series_description,
        warnings=warnings,
        source_headers=headers,
    )


def _pixel_data_cut_short(ds: Dataset) -> bool:
    """Whether native Pixel Data holds fewer bytes than its element declares (a lying or cut file)."""
    element = ds.get_item(0x7FE00010) if "PixelData" in ds else None
    length = getattr(element, "length", None)
    value = getattr(element, "value", None)
    if not isinstance(length, int) or length == 0xFFFFFFFF or not isinstance(value, bytes | bytearray):
        return False
    return len(value) < length


def read_source_headers(series: CtSeries) -> list[pydicom.Dataset]:
    """The chosen series' datasets in sorted order, headers only (for DICOM SEG/SR writing).

    The headers kept by :func:`load_study` when there are; else each file is read again.
    """
    if series.source_headers is not None and len(series.source_headers) == series.n_slices:
        return list(series.source_headers)
    return [read_dataset(ref.path, stop_before_pixels=True) for ref in series.slices]


def study_info(ds: Dataset) -> StudyInfo:
    """Study identifiers and times from one data set of the measured series."""
    return StudyInfo(
        study_instance_uid=_text(ds, "StudyInstanceUID") or "",
        patient_id=_text(ds, "PatientID"),
        issuer_of_patient_id=_text(ds, "IssuerOfPatientID"),
        accession_number=_text(ds, "AccessionNumber"),
        study_date=_text(ds, "StudyDate"),
        study_time=_text(ds, "StudyTime"),
        acquisition_datetime=acquisition_datetime(ds),
        patient_name=_text(ds, "PatientName"),
    )


def acquisition_datetime(ds: Dataset) -> str | None:
    """AcquisitionDateTime (DT), else AcquisitionDate + AcquisitionTime, else None."""
    combined = _text(ds, "AcquisitionDateTime")
    if combined:
        return combined
    date = _text(ds, "AcquisitionDate")
    if not date:
        return None
    return date + (_text(ds, "AcquisitionTime") or "")


def _slab_thicknesses(chosen: UsableSeries, warnings: list[str]) -> np.ndarray:
    if len(chosen.positions_mm) >= 2:
        return geometry.slab_thicknesses(np.asarray(chosen.positions_mm))
    nominal = chosen.summary.slice_thickness_mm
    if nominal is None or not math.isfinite(nominal) or nominal <= 0:
        raise StudyError(
            ErrorCode.MISSING_GEOMETRY,
            "a single slice without a valid SliceThickness: its slab thickness is unknown",
        )
    warnings.append(f"a single slice: its slab thickness is the nominal SliceThickness, {nominal:g} mm")
    return np.array([nominal], dtype=np.float64)


def _position(value: tuple[float, float, float] | None) -> tuple[float, float, float]:
    assert value is not None  # selection rejects series without ImagePositionPatient
    return value


def _text(ds: Dataset, keyword: str) -> str | None:
    try:
        value = ds.get(keyword)
    except BaseException as exc:  # pydicom converts on access; a malformed value raises here
        if must_propagate(exc):
            raise
        return None
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return path.name
