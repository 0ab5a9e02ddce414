"""Choose the one series of a study to measure, and say why every other one was not.

Input is headers only (:class:`worker.imaging.dicom_files.DicomHeader`); nothing here reads
pixels, so every size limit is checked before anything is allocated.

A series is usable when, checked in this order:

1. its Modality is CT (else ``NO_CT_SERIES``);
2. it is an original image: not Secondary Capture, not ImageType DERIVED\\SECONDARY,
   not a colour screenshot, not a non-image object such as a dose report (else
   ``ONLY_DERIVED``);
3. it is not a localizer (ImageType LOCALIZER; else ``ONLY_LOCALIZERS``);
4. its images are single-frame CT Image Storage (else ``MULTIFRAME_UNSUPPORTED``);
5. every image has Rows and Columns of at least :data:`MIN_IMAGE_SIDE` (else
   ``UNSUPPORTED_PIXEL_FORMAT``), rows x columns is at most ``max_slice_pixels`` (else
   ``TOO_LARGE``) and every image has the same rows and columns (else
   ``INCONSISTENT_GEOMETRY``);
6. every image has pixel data (else ``MISSING_PIXEL_DATA``), ImagePositionPatient,
   ImageOrientationPatient and PixelSpacing (else ``MISSING_GEOMETRY``), finite and
   positive spacing and orthonormal cosines (else ``INVALID_GEOMETRY``), the same
   orientation and spacing on every image (else ``INCONSISTENT_GEOMETRY``);
7. the slice normal is within ``max_tilt_deg`` of patient z (else ``NOT_AXIAL``), so
   gantry-tilted axial series count;
8. after dropping duplicate positions (within 0.01 mm along the normal), it has at most
   ``max_slices`` (else ``TOO_LARGE``) and at least ``min_slices`` slices (else
   ``TOO_FEW_SLICES``).

Among usable series the one whose slice thickness (SliceThickness, else the median gap)
is nearest ``preferred_thickness_mm`` wins (the model was trained on thick slices), then
the one with more slices, then the lower SeriesNumber, then the lower UID.

When none is usable, :func:`select_series` raises one :class:`StudyError`. Series that
were never candidates (not CT, derived, localizers) are set apart: if any CT image series
failed a later check, the code is that check's code when all such series agree, else
``NO_USABLE_SERIES``; if only never-candidates exist, their common code, else
``NO_USABLE_SERIES``. The one-line message names every series and its reason.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from worker.core.ct import RejectedSeries, SeriesSelection, SeriesSummary
from worker.core.errors import ErrorCode, StudyError
from worker.imaging import geometry
from worker.imaging.dicom_files import DicomHeader, group_by_series

if TYPE_CHECKING:
    from worker.core.settings import Settings

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_ENHANCED_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"  # .7 and the multi-frame .7.1 to .7.4

#: Smallest Rows or Columns of a CT image worth measuring (a 1x1 "image" measures 0 mL).
MIN_IMAGE_SIDE = 16
#: Positions closer than this along the normal (mm) are the same slice.
DUPLICATE_TOLERANCE_MM = 0.01
#: Largest difference between images of one series in a direction cosine.
ORIENTATION_TOLERANCE = 1e-3
#: Largest difference between images of one series in pixel spacing (mm).
SPACING_TOLERANCE_MM = 1e-3

# Codes of series that were never candidates for measurement.
_NEVER_CANDIDATE = (ErrorCode.NO_CT_SERIES, ErrorCode.ONLY_DERIVED, ErrorCode.ONLY_LOCALIZERS)
_MESSAGE_HEAD = {
    ErrorCode.NO_CT_SERIES: "no CT image series in the study",
    ErrorCode.ONLY_DERIVED: (
        "only derived or secondary images (screenshots, dose reports) in the study; export the axial CT series"
    ),
    ErrorCode.ONLY_LOCALIZERS: "only localizer (scout) images in the study; export the axial CT series",
    ErrorCode.MULTIFRAME_UNSUPPORTED: (
        "multi-frame (enhanced) CT is not supported; export the series as single-frame CT images"
    ),
    ErrorCode.TOO_LARGE: "the CT series is too large to process",
    ErrorCode.UNSUPPORTED_PIXEL_FORMAT: "the images of the CT series have an unusable pixel format",
    ErrorCode.INCONSISTENT_GEOMETRY: "the slices of the CT series disagree on their geometry",
    ErrorCode.MISSING_PIXEL_DATA: "images of the CT series have no pixel data",
    ErrorCode.MISSING_GEOMETRY: "the CT series lacks position, orientation or pixel spacing tags",
    ErrorCode.INVALID_GEOMETRY: "the CT series has invalid geometry tags",
    ErrorCode.NOT_AXIAL: "no axial CT series in the study",
    ErrorCode.TOO_FEW_SLICES: "the CT series has too few slices",
    ErrorCode.NO_USABLE_SERIES: "no usable axial CT series in the study",
}
_MAX_LISTED = 8


@dataclass(frozen=True)
class SelectionRules:
    """What makes a series measurable, and the limits that protect the worker."""

    max_tilt_deg: float = 30.0  # slice normal within this of patient z counts as axial
    min_slices: int = 5
    preferred_thickness_mm: float = 5.0
    max_slice_pixels: int = 2048 * 2048  # rows*columns above this: refuse (TOO_LARGE)
    max_slices: int = 2000  # more slices: refuse (TOO_LARGE)
    max_files: int = 20000  # more files in the folder: refuse (TOO_MANY_FILES)

    @classmethod
    def from_settings(cls, settings: Settings) -> SelectionRules:
        return cls(
            max_tilt_deg=settings.series_max_tilt_deg,
            min_slices=settings.series_min_slices,
            preferred_thickness_mm=settings.series_preferred_thickness_mm,
            max_slice_pixels=settings.max_slice_pixels,
            max_slices=settings.max_slices,
            max_files=settings.max_files,
        )


@dataclass(frozen=True)
class UsableSeries:
    """A series that passed every rule: its images sorted along the normal, duplicates dropped.

    ``positions_mm[i]`` is ImagePositionPatient of ``headers[i]`` projected on ``normal``
    (mm, strictly ascending). Cosines and spacing are those of the first image (all agree
    within tolerance).
    """

    summary: SeriesSummary
    headers: tuple[DicomHeader, ...]
    positions_mm: tuple[float, ...]
    row_cosine: tuple[float, float, float]
    column_cosine: tuple[float, float, float]
    pixel_spacing_mm: tuple[float, float]
    rows: int
    columns: int
    tilt_deg: float
    thickness_mm: float  # SliceThickness (median over images), else the median gap
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class SelectionOutcome:
    """The chosen series with its sorted images, and the record of the whole selection."""

    chosen: UsableSeries
    selection: SeriesSelection


def summarise(headers: Sequence[DicomHeader]) -> SeriesSummary:
    """The :class:`SeriesSummary` of one series' headers (first image's descriptive tags)."""
    first = headers[0]
    thicknesses = [h.slice_thickness_mm for h in headers if h.slice_thickness_mm is not None]
    finite = [t for t in thicknesses if math.isfinite(t)]
    return SeriesSummary(
        series_instance_uid=first.series_instance_uid,
        n_files=len(headers),
        modality=first.modality,
        series_description=first.series_description,
        series_number=first.series_number,
        slice_thickness_mm=float(np.median(finite)) if finite else None,
    )


def evaluate_series(headers: Sequence[DicomHeader], *, rules: SelectionRules) -> UsableSeries | RejectedSeries:
    """Apply the rules (module docstring) to the images of one series."""
    summary = summarise(headers)

    def reject(code: ErrorCode, reason: str) -> RejectedSeries:
        return RejectedSeries(series=summary, code=code.value, reason=reason)

    modalities = sorted({h.modality or "unknown" for h in headers})
    if modalities != ["CT"]:
        return reject(ErrorCode.NO_CT_SERIES, f"modality {'/'.join(modalities)}, not CT")

    derived = _derived_reason(headers)
    if derived is not None:
        return reject(ErrorCode.ONLY_DERIVED, derived)
    if any("LOCALIZER" in h.image_type for h in headers):
        return reject(ErrorCode.ONLY_LOCALIZERS, "localizer (ImageType contains LOCALIZER)")

    multiframe = [h for h in headers if (h.number_of_frames or 1) > 1]
    if multiframe or any(h.sop_class_uid in (ENHANCED_CT_STORAGE, LEGACY_ENHANCED_CT_STORAGE) for h in headers):
        frames = max((h.number_of_frames or 1) for h in headers)
        return reject(
            ErrorCode.MULTIFRAME_UNSUPPORTED,
            f"multi-frame (enhanced) CT, {frames} frame(s) per file: not supported",
        )
    others = sorted({h.sop_class_uid for h in headers if h.sop_class_uid != CT_IMAGE_STORAGE})
    if others:
        return reject(ErrorCode.NO_CT_SERIES, f"SOP class {others[0]} is not CT Image Storage")

    bad_sizes = sorted(
        {
            "unreadable" if h.rows is None or h.columns is None else f"{h.rows}x{h.columns}"
            for h in headers
            if h.rows is None or h.columns is None or h.rows < MIN_IMAGE_SIDE or h.columns < MIN_IMAGE_SIDE
        }
    )
    if bad_sizes:
        return reject(
            ErrorCode.UNSUPPORTED_PIXEL_FORMAT,
            f"Rows x Columns {', '.join(bad_sizes)}: a CT image has at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} pixels",
        )
    sizes = {(h.rows or 0, h.columns or 0) for h in headers}
    largest = max(r * c for r, c in sizes)
    if largest > rules.max_slice_pixels:
        r, c = max(sizes, key=lambda rc: rc[0] * rc[1])
        return reject(ErrorCode.TOO_LARGE, f"{r}x{c} pixels per slice, at most {rules.max_slice_pixels} accepted")
    if len(sizes) > 1:
        listed = ", ".join(f"{r}x{c}" for r, c in sorted(sizes))
        return reject(ErrorCode.INCONSISTENT_GEOMETRY, f"slices differ in rows x columns ({listed})")

    no_pixels = sum(1 for h in headers if not h.has_pixel_data)
    if no_pixels:
        return reject(ErrorCode.MISSING_PIXEL_DATA, f"{no_pixels} of {len(headers)} images have no pixel data")

    geometry_problem = _geometry_problem(headers)
    if geometry_problem is not None:
        return reject(*geometry_problem)

    first = headers[0]
    assert first.image_orientation is not None and first.pixel_spacing_mm is not None  # _geometry_problem
    row_cosine = (first.image_orientation[0], first.image_orientation[1], first.image_orientation[2])
    column_cosine = (first.image_orientation[3], first.image_orientation[4], first.image_orientation[5])
    try:
        normal = geometry.slice_normal(row_cosine, column_cosine)
    except StudyError as exc:
        return reject(exc.code, exc.message)
    tilt = geometry.tilt_deg(normal)
    if tilt > rules.max_tilt_deg:
        return reject(
            ErrorCode.NOT_AXIAL,
            f"not axial: slice normal {tilt:.1f} deg from patient z (at most {rules.max_tilt_deg:g}); "
            "a localizer or a reformat",
        )

    ordered, positions, dropped = _sort_and_deduplicate(headers, normal)
    warnings: list[str] = []
    if dropped:
        warnings.append(
            f"dropped {dropped} image(s) at duplicate positions (within {DUPLICATE_TOLERANCE_MM} mm along "
            "the normal), kept the lowest InstanceNumber"
        )
    n = len(ordered)
    if n > rules.max_slices:
        return reject(ErrorCode.TOO_LARGE, f"{n} slices, at most {rules.max_slices} accepted")
    if n < rules.min_slices:
        return reject(ErrorCode.TOO_FEW_SLICES, f"{n} slice{'s' if n != 1 else ''}, at least {rules.min_slices} needed")

    thickness = summary.slice_thickness_mm
    if thickness is None or thickness <= 0:
        thickness = float(np.median(np.diff(positions))) if n >= 2 else math.nan
    return UsableSeries(
        summary=summary,
        headers=tuple(ordered),
        positions_mm=tuple(float(p) for p in positions),
        row_cosine=row_cosine,
        column_cosine=column_cosine,
        pixel_spacing_mm=first.pixel_spacing_mm,
        rows=first.rows or 0,
        columns=first.columns or 0,
        tilt_deg=tilt,
        thickness_mm=thickness,
        warnings=tuple(warnings),
    )


def select_series(headers: Sequence[DicomHeader], *, rules: SelectionRules) -> SelectionOutcome:
    """Evaluate every series among ``headers`` and choose one (see the module docstring).

    Raises :class:`StudyError` when no series is usable, with the code that says why.
    """
    usable: list[UsableSeries] = []
    rejected: list[RejectedSeries] = []
    for group in group_by_series(list(headers)).values():
        outcome = evaluate_series(group, rules=rules)
        if isinstance(outcome, UsableSeries):
            usable.append(outcome)
        else:
            rejected.append(outcome)
    if not usable:
        raise _no_usable_series(rejected)
    usable.sort(key=lambda s: _preference(s, rules))
    chosen, *others = usable
    for other in others:
        rejected.append(
            RejectedSeries(
                series=other.summary,
                code="not_preferred",
                reason=(
                    f"not preferred: {len(other.headers)} slices of {other.thickness_mm:.2f} mm; chose "
                    f"{_label(chosen.summary)} ({len(chosen.headers)} slices of {chosen.thickness_mm:.2f} mm)"
                ),
            )
        )
    selection = SeriesSelection(chosen=chosen.summary, rejected=tuple(rejected))
    return SelectionOutcome(chosen=chosen, selection=selection)


def _preference(series: UsableSeries, rules: SelectionRules) -> tuple[float, int, int, str]:
    distance = abs(series.thickness_mm - rules.preferred_thickness_mm)
    number = series.summary.series_number
    return (
        distance if math.isfinite(distance) else math.inf,
        -len(series.headers),
        number if number is not None else 2**31,
        series.summary.series_instance_uid,
    )


def _derived_reason(headers: Sequence[DicomHeader]) -> str | None:
    for h in headers:
        if h.sop_class_uid.startswith(SECONDARY_CAPTURE_PREFIX):
            return "secondary capture (SOP class Secondary Capture Image Storage)"
    for h in headers:
        if len(h.image_type) >= 2 and h.image_type[0] == "DERIVED" and h.image_type[1] == "SECONDARY":
            return "derived/secondary image (ImageType DERIVED\\SECONDARY)"
    for h in headers:
        # A CT Image Storage object without usable Rows/Columns is a broken image (rule 5).
        if (h.rows is None or h.columns is None) and h.sop_class_uid != CT_IMAGE_STORAGE:
            return f"not an image (no Rows/Columns; SOP class {h.sop_class_uid}), e.g. a dose report"
        if (h.samples_per_pixel or 1) != 1:
            return f"colour image ({h.samples_per_pixel} samples per pixel): a screenshot, not CT"
    return None


def _geometry_problem(headers: Sequence[DicomHeader]) -> tuple[ErrorCode, str] | None:
    n = len(headers)
    missing = []
    for name, attr in (
        ("ImagePositionPatient", "image_position_mm"),
        ("ImageOrientationPatient", "image_orientation"),
        ("PixelSpacing", "pixel_spacing_mm"),
    ):
        count = sum(1 for h in headers if getattr(h, attr) is None)
        if count:
            missing.append(f"{name} missing on {count} of {n} images")
    if missing:
        return ErrorCode.MISSING_GEOMETRY, "; ".join(missing)

    spacings = np.array([h.pixel_spacing_mm for h in headers], dtype=np.float64)
    orientations = np.array([h.image_orientation for h in headers], dtype=np.float64)
    positions = np.array([h.image_position_mm for h in headers], dtype=np.float64)
    if not np.all(np.isfinite(spacings)) or not np.all(spacings > 0):
        bad = spacings[~np.all(np.isfinite(spacings) & (spacings > 0), axis=1)][0]
        return ErrorCode.INVALID_GEOMETRY, f"PixelSpacing {_fmt(bad)} is not two positive numbers (mm)"
    if not np.all(np.isfinite(orientations)):
        return ErrorCode.INVALID_GEOMETRY, "ImageOrientationPatient is not six finite numbers"
    if not np.all(np.isfinite(positions)):
        return ErrorCode.INVALID_GEOMETRY, "ImagePositionPatient is not three finite numbers (mm)"
    if np.ptp(orientations, axis=0).max() > ORIENTATION_TOLERANCE:
        return ErrorCode.INCONSISTENT_GEOMETRY, "slices differ in ImageOrientationPatient"
    if np.ptp(spacings, axis=0).max() > SPACING_TOLERANCE_MM:
        low, high = spacings.min(axis=0), spacings.max(axis=0)
        return (
            ErrorCode.INCONSISTENT_GEOMETRY,
            f"slices differ in PixelSpacing ({_fmt(low)} to {_fmt(high)} mm)",
        )
    return None


def _sort_and_deduplicate(
    headers: Sequence[DicomHeader], normal: np.ndarray
) -> tuple[list[DicomHeader], np.ndarray, int]:
    """Headers sorted by position along ``normal``, one per position.

    Images within :data:`DUPLICATE_TOLERANCE_MM` of the first image of a cluster are
    duplicates; the one with the lowest (InstanceNumber, SOPInstanceUID) is kept, so the
    choice does not depend on file order. Returns the kept headers, their positions (mm,
    strictly ascending) and how many were dropped.
    """
    positions = geometry.project_positions(np.array([h.image_position_mm for h in headers]), normal)

    def preference(i: int) -> tuple[int, str]:
        number = headers[i].instance_number
        return (number if number is not None else 2**31, headers[i].sop_instance_uid)

    order = sorted(range(len(headers)), key=lambda i: (float(positions[i]), preference(i)))
    clusters: list[list[int]] = []
    for i in order:
        if clusters and positions[i] - positions[clusters[-1][0]] <= DUPLICATE_TOLERANCE_MM:
            clusters[-1].append(i)
        else:
            clusters.append([i])
    kept = [min(cluster, key=preference) for cluster in clusters]
    dropped = len(headers) - len(kept)
    return [headers[i] for i in kept], positions[kept], dropped


def _no_usable_series(rejected: list[RejectedSeries]) -> StudyError:
    codes = [ErrorCode(r.code) for r in rejected]
    candidates = [c for c in codes if c not in _NEVER_CANDIDATE]
    pool = candidates or codes
    code = pool[0] if len(set(pool)) == 1 else ErrorCode.NO_USABLE_SERIES
    listed = [f"{_label(r.series)}: {r.reason}" for r in rejected[:_MAX_LISTED]]
    if len(rejected) > _MAX_LISTED:
        listed.append(f"and {len(rejected) - _MAX_LISTED} more series")
    return StudyError(code, f"{_MESSAGE_HEAD[code]} ({'; '.join(listed)})")


def _label(summary: SeriesSummary) -> str:
    number = f"series {summary.series_number}" if summary.series_number is not None else "series"
    # Descriptions are free text: collapse whitespace so the message stays on one line.
    text = " ".join((summary.series_description or "").split())
    description = f" '{text}'" if text else ""
    uid = "" if summary.series_number is not None else f" ...{summary.series_instance_uid[-8:]}"
    return f"{number}{description}{uid} ({summary.n_files} file{'s' if summary.n_files != 1 else ''})"


def _fmt(values: np.ndarray) -> str:
    return "\\".join(f"{v:g}" for v in values)
