"""The results as DICOM for a PACS: a TID 1500 measurement report (SR).

It is built after the result is committed, from the database row and the stored
``seg.dcm`` (see :mod:`worker.delivery.deliveries`), and takes patient and study identity
from the SEG, as the overlay secondary capture does (:mod:`worker.outputs.secondary_capture`),
so the three land in the CT's study.

The Structured Report (:func:`build_volume_sr`)
------------------------------------------------
A Comprehensive 3D SR, template TID 1500 "Imaging Measurement Report" (highdicom), with
one volumetric measurement group (TID 1411) for the hematoma:

* referenced segment: segment 1 of the SEG (its SOP Instance UID), with the measured CT
  series as "Source series for segmentation"; the SEG and every CT instance it references
  are listed in the Current Requested Procedure Evidence Sequence;
* finding type Hematoma (SCT 35566002), finding category Morphologically abnormal
  structure (SCT 49755003), finding site Brain (SCT 12738006), procedure reported
  Computed tomography of head (SCT 303653007);
* algorithm identification (TID 4019): the model's name and version, family Artificial
  Intelligence (DCM 123110), the model file's SHA-256 as a parameter; the device observer
  is ichvol with the model's name as its model name.

Measurements (TID 300), each a NUM with a UCUM unit:

======================================  ===============================================  ==========
concept name                            method / meaning                                 unit
======================================  ===============================================  ==========
Volume (SCT 118565006)                  Sum of segmented voxel method for volume         ml
                                        (DCM 126030): the planimetric volume, every
                                        hematoma pixel x row spacing x column spacing x
                                        its slab thickness along the slice normal
Volume of ellipsoid (DCM 121221)        LWH method for volume of ellipsoid (DCM 126029):  ml
                                        ABC/2 (Kothari 1996) from the same mask, as
                                        defined in docs/outputs.md
Number of slices (99ICHVOL NSLICES)     slices of the measured series                    {slices}
Spacing between slices (DCM 112226)     mean slab thickness along the slice normal       mm
Vertical Pixel Spacing (DCM 111066)     PixelSpacing[0], between rows                     mm
Horizontal Pixel Spacing (DCM 111026)   PixelSpacing[1], between columns                  mm
Length (SCT 410668003)                  ABC/2's A: the longest diameter of the hematoma   mm
                                        on the slice with the most hematoma
Width (SCT 103355008)                   ABC/2's B: the longest chord perpendicular to A   mm
Height (DCM 121207)                     ABC/2's C: the slab thicknesses of the hematoma   mm
                                        slices weighted 1, 0.5 or 0 by their area
======================================  ===============================================  ==========

A, B and C are the lengths the ABC/2 value is made of (length, width and height, as the
LWH method names them); A x B x C / 2 mm^3 is the "Volume of ellipsoid" in mL x 1000.
Results recorded before the lengths were kept have an SR without them.

No standard code names "number of slices"; it uses the private coding scheme
``99ICHVOL`` (a ``99`` prefix marks a local scheme in DICOM). The document closes with a
"Qualitative Evaluations" container (UMLS C0034375) holding a TEXT "Comment"
(DCM 121106) with the research-use statement and how the two volumes were computed.
The SR is unverified and preliminary; its series description says "research use only".

UIDs are derived from the SEG's SOP Instance UID (``2.25.<hash>``): building the SR twice
for the same result gives the same instance, so a redelivery replaces rather than
duplicates it in the PACS.

Amendment: when the study was measured before (another model version, an adapted model)
and that result's SR was sent, the new SR names it in its Predecessor Documents Sequence
(``replaces``; chosen by :mod:`worker.delivery.deliveries`), so a PACS reader sees which
report is current. It is a new instance in a new series: the old one stays as it was sent.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes

import worker
from worker.core.notices import DISCLAIMER

__all__ = [
    "SR_SERIES_DESCRIPTION",
    "PredecessorSr",
    "VolumeReport",
    "build_volume_sr",
    "derived_uid",
    "read_volume_report",
]

SR_SERIES_DESCRIPTION = "ICH volume report (research use only)"
SR_SERIES_NUMBER = 902
MANUFACTURER = "ichvol"
TRACKING_LABEL = "Hematoma"

#: Units (UCUM).
UNIT_ML = CodedConcept("ml", "UCUM", "milliliter")
UNIT_MM = CodedConcept("mm", "UCUM", "millimeter")
UNIT_SLICES = CodedConcept("{slices}", "UCUM", "slices")

#: Concept names and methods (see the module docstring).
VOLUME = CodedConcept("118565006", "SCT", "Volume")
VOLUME_OF_ELLIPSOID = CodedConcept("121221", "DCM", "Volume of ellipsoid")
SUM_OF_VOXELS_METHOD = CodedConcept("126030", "DCM", "Sum of segmented voxel method for volume")
LWH_ELLIPSOID_METHOD = CodedConcept("126029", "DCM", "LWH method for volume of ellipsoid")
NUMBER_OF_SLICES = CodedConcept("NSLICES", "99ICHVOL", "Number of slices")
SPACING_BETWEEN_SLICES = CodedConcept("112226", "DCM", "Spacing between slices")
VERTICAL_PIXEL_SPACING = CodedConcept("111066", "DCM", "Vertical Pixel Spacing")
HORIZONTAL_PIXEL_SPACING = CodedConcept("111026", "DCM", "Horizontal Pixel Spacing")
ABC2_A = CodedConcept("410668003", "SCT", "Length")
ABC2_B = CodedConcept("103355008", "SCT", "Width")
ABC2_C = CodedConcept("121207", "DCM", "Height")
HEMATOMA = CodedConcept("35566002", "SCT", "Hematoma")
ABNORMAL_STRUCTURE = CodedConcept("49755003", "SCT", "Morphologically abnormal structure")
BRAIN = CodedConcept("12738006", "SCT", "Brain")
CT_OF_HEAD = CodedConcept("303653007", "SCT", "Computed tomography of head")
QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
COMMENT = CodedConcept("121106", "DCM", "Comment")

METHOD_TEXT = (
    "Volume: the sum over hematoma pixels of row spacing x column spacing x the slice's slab "
    "thickness along the slice normal (half the gap to each neighbouring slice). "
    "Volume of ellipsoid: ABC/2 (Kothari 1996) from the same mask; A: the longest diameter of the "
    "hematoma outline on the slice with the most hematoma, B: the longest chord perpendicular to A, "
    "C: the slab thicknesses of the hematoma slices weighted 1, 0.5 or 0 by their area relative to "
    "that slice (75 % or more, 25 to 75 %, under 25 %); A x B x C / 2."
)

UInt8Image = npt.NDArray[np.uint8]

_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:ichvol:dicom-uid")


@dataclass(frozen=True)
class VolumeReport:
    """The numbers an SR carries: those of one ``results`` row and its run.

    ``volume_ml``: planimetric hematoma volume (mL); ``abc2_ml``: ABC/2 estimate (mL);
    ``n_slices``: slices of the measured series; ``pixel_spacing_mm``: DICOM PixelSpacing
    order (between rows, between columns), mm; ``slab_thickness_mean_mm``: mean slab
    thickness along the slice normal, mm; ``series_instance_uid``: the measured CT series;
    ``abc2_a_mm``, ``abc2_b_mm``, ``abc2_c_mm``: the ABC/2 lengths, mm (None: left out,
    for results recorded before they were kept).
    """

    volume_ml: float
    abc2_ml: float
    n_slices: int
    pixel_spacing_mm: tuple[float, float]
    slab_thickness_mean_mm: float
    series_instance_uid: str
    model_name: str
    model_version: str
    model_sha256: str = ""
    abc2_a_mm: float | None = None
    abc2_b_mm: float | None = None
    abc2_c_mm: float | None = None

    @property
    def abc2_lengths_mm(self) -> tuple[float, float, float] | None:
        """(A, B, C) in mm when all three are known."""
        a, b, c = self.abc2_a_mm, self.abc2_b_mm, self.abc2_c_mm
        return None if a is None or b is None or c is None else (a, b, c)


@dataclass(frozen=True)
class PredecessorSr:
    """The SR a new one replaces: the UIDs its Predecessor Documents Sequence names."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str = str(pydicom.uid.Comprehensive3DSRStorage)

    def as_dataset(self) -> pydicom.Dataset:
        """A header-only stand-in (the four UIDs), as highdicom reads previous versions."""
        ds = pydicom.Dataset()
        ds.StudyInstanceUID = self.study_instance_uid
        ds.SeriesInstanceUID = self.series_instance_uid
        ds.SOPClassUID = self.sop_class_uid
        ds.SOPInstanceUID = self.sop_instance_uid
        return ds


def derived_uid(*parts: str) -> str:
    """A ``2.25.<n>`` UID that is a pure function of ``parts`` (same inputs, same UID).

    ``n`` is the integer of a name-based (SHA-1, version 5) UUID of the parts, as DICOM
    PS3.5 B.2 allows for UUID-derived UIDs.
    """
    name = "\x1f".join(parts)
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def _referenced_ct(seg: pydicom.Dataset) -> tuple[str, list[tuple[str, str]]]:
    """The SEG's source series UID and its ``(SOP class, SOP instance)`` UIDs."""
    try:
        series = seg.ReferencedSeriesSequence[0]
        instances = [
            (str(item.ReferencedSOPClassUID), str(item.ReferencedSOPInstanceUID))
            for item in series.ReferencedInstanceSequence
        ]
        return str(series.SeriesInstanceUID), instances
    except (AttributeError, IndexError) as exc:
        raise ValueError("the SEG lacks ReferencedSeriesSequence: it does not name its source CT series") from exc


def _evidence(seg: pydicom.Dataset, series_uid: str, instances: Sequence[tuple[str, str]]) -> list[pydicom.Dataset]:
    """The SEG, then one header-only stand-in per referenced CT instance (UIDs only)."""
    evidence = [seg]
    for sop_class_uid, sop_instance_uid in instances:
        ds = pydicom.Dataset()
        ds.StudyInstanceUID = seg.StudyInstanceUID
        ds.SeriesInstanceUID = series_uid
        ds.SOPClassUID = sop_class_uid
        ds.SOPInstanceUID = sop_instance_uid
        evidence.append(ds)
    return evidence


def _measurement(
    name: CodedConcept, value: float, unit: CodedConcept, method: CodedConcept | None = None
) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=name, value=float(value), unit=unit, method=method)


def _check(report: VolumeReport) -> None:
    values = {
        "volume_ml": report.volume_ml,
        "abc2_ml": report.abc2_ml,
        "slab_thickness_mean_mm": report.slab_thickness_mean_mm,
        "pixel_spacing_mm[0]": report.pixel_spacing_mm[0],
        "pixel_spacing_mm[1]": report.pixel_spacing_mm[1],
    }
    for name, length in zip(("abc2_a_mm", "abc2_b_mm", "abc2_c_mm"), report.abc2_lengths_mm or (), strict=False):
        values[name] = length
    for name, value in values.items():
        if not np.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if report.n_slices <= 0:
        raise ValueError(f"n_slices must be positive, got {report.n_slices}")


def build_volume_sr(
    *, seg: pydicom.Dataset, report: VolumeReport, replaces: PredecessorSr | None = None
) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 measurement report of one result (layout: module docstring).

    ``seg``: the result's DICOM Segmentation (``seg.dcm``, full dataset); its patient,
    study and source-series references are used. ``report``: the numbers, from the
    ``results`` row. ``replaces``: the earlier SR of the study this one amends (named in
    the Predecessor Documents Sequence). Raises ``ValueError`` when the SEG does not
    reference ``report.series_instance_uid``, a number is negative or not finite, or
    ``replaces`` is this SR itself.
    """
    _check(report)
    series_uid, instances = _referenced_ct(seg)
    if series_uid != report.series_instance_uid:
        raise ValueError(
            f"the SEG references series {series_uid}, the result was measured on {report.series_instance_uid}"
        )
    algorithm = hd.sr.AlgorithmIdentification(
        name=report.model_name,
        version=report.model_version,
        parameters=[f"sha256={report.model_sha256}"] if report.model_sha256 else None,
        family=codes.cid7162.ArtificialIntelligence,
    )
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derived_uid("device", report.model_name, report.model_version),
        name=MANUFACTURER,
        manufacturer_name=MANUFACTURER,
        model_name=f"{report.model_name} {report.model_version}"[:64],
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )
    segment = hd.sr.ReferencedSegment(
        sop_class_uid=str(seg.SOPClassUID),
        sop_instance_uid=str(seg.SOPInstanceUID),
        segment_number=1,
        source_series=hd.sr.SourceSeriesForSegmentation(series_uid),
    )
    measurements = [
        _measurement(VOLUME, report.volume_ml, UNIT_ML, SUM_OF_VOXELS_METHOD),
        _measurement(VOLUME_OF_ELLIPSOID, report.abc2_ml, UNIT_ML, LWH_ELLIPSOID_METHOD),
        _measurement(NUMBER_OF_SLICES, report.n_slices, UNIT_SLICES),
        _measurement(SPACING_BETWEEN_SLICES, report.slab_thickness_mean_mm, UNIT_MM),
        _measurement(VERTICAL_PIXEL_SPACING, report.pixel_spacing_mm[0], UNIT_MM),
        _measurement(HORIZONTAL_PIXEL_SPACING, report.pixel_spacing_mm[1], UNIT_MM),
    ]
    lengths = report.abc2_lengths_mm
    if lengths is not None:
        measurements += [
            _measurement(name, v, UNIT_MM) for name, v in zip((ABC2_A, ABC2_B, ABC2_C), lengths, strict=True)
        ]
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid("tracking", str(seg.SOPInstanceUID)), identifier=TRACKING_LABEL
        ),
        referenced_segment=segment,
        finding_type=HEMATOMA,
        finding_category=ABNORMAL_STRUCTURE,
        finding_sites=[hd.sr.FindingSite(BRAIN)],
        algorithm_id=algorithm,
        measurements=measurements,
    )
    content = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=CT_OF_HEAD,
        imaging_measurements=[group],
        title=codes.cid7021.ImagingMeasurementReport,
    )
    evaluations = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    evaluations.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=COMMENT,
                value=f"{DISCLAIMER} {METHOD_TEXT}",
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        ]
    )
    content[0].ContentSequence.append(evaluations)
    sop_instance_uid = derived_uid("sr", str(seg.SOPInstanceUID))
    if replaces is not None and replaces.sop_instance_uid == sop_instance_uid:
        raise ValueError("an SR cannot replace itself")
    sr = hd.sr.Comprehensive3DSR(
        evidence=_evidence(seg, series_uid, instances),
        content=content[0],
        series_instance_uid=derived_uid("sr-series", str(seg.SOPInstanceUID)),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=SR_SERIES_DESCRIPTION,
        software_versions=worker.__version__,
        previous_versions=[replaces.as_dataset()] if replaces is not None else None,
    )
    return sr


def _numbers_by_name(sr: pydicom.Dataset) -> dict[tuple[str, str], list[tuple[float, str, str | None]]]:
    """Every NUM of the SR's measurement groups: ``(scheme, code) -> [(value, unit, method code)]``."""
    found: dict[tuple[str, str], list[tuple[float, str, str | None]]] = {}

    def walk(items: Sequence[pydicom.Dataset]) -> None:
        for item in items:
            if item.get("ValueType") == "NUM":
                name = item.ConceptNameCodeSequence[0]
                measured = item.MeasuredValueSequence[0]
                unit = str(measured.MeasurementUnitsCodeSequence[0].CodeValue)
                method = None
                for child in item.get("ContentSequence", []):
                    concept = child.ConceptNameCodeSequence[0]
                    if (concept.CodingSchemeDesignator, concept.CodeValue) == ("SCT", "370129005"):
                        method = str(child.ConceptCodeSequence[0].CodeValue)
                key = (str(name.CodingSchemeDesignator), str(name.CodeValue))
                found.setdefault(key, []).append((float(measured.NumericValue), unit, method))
            walk(item.get("ContentSequence", []))

    walk(sr.get("ContentSequence", []))
    return found


def read_volume_report(sr: pydicom.Dataset) -> dict[str, float | int | str]:
    """The numbers of an SR written by :func:`build_volume_sr` (as read back from a PACS).

    Returns ``volume_ml``, ``abc2_ml``, ``n_slices``, ``slab_thickness_mean_mm``,
    ``pixel_spacing_row_mm``, ``pixel_spacing_col_mm``, ``segmentation_sop_instance_uid``,
    ``source_series_instance_uid``, ``algorithm_name`` and ``algorithm_version``; also
    ``abc2_a_mm``, ``abc2_b_mm``, ``abc2_c_mm`` where the SR has them and
    ``replaces_sop_instance_uid`` where it amends an earlier SR. Raises ``ValueError``
    when a required one is missing or a number has an unexpected unit.
    """
    numbers = _numbers_by_name(sr)

    def one(concept: CodedConcept, unit: CodedConcept, method: CodedConcept | None = None) -> float:
        rows = numbers.get((concept.scheme_designator, concept.value), [])
        wanted = [r for r in rows if method is None or r[2] == method.value]
        if len(wanted) != 1:
            raise ValueError(f"expected one {concept.meaning!r} measurement, found {len(wanted)}")
        value, got_unit, _ = wanted[0]
        if got_unit != unit.value:
            raise ValueError(f"{concept.meaning!r} is in {got_unit!r}, expected {unit.value!r}")
        return value

    texts = _texts_by_name(sr)
    out: dict[str, float | int | str] = {
        "volume_ml": one(VOLUME, UNIT_ML, SUM_OF_VOXELS_METHOD),
        "abc2_ml": one(VOLUME_OF_ELLIPSOID, UNIT_ML, LWH_ELLIPSOID_METHOD),
        "n_slices": round(one(NUMBER_OF_SLICES, UNIT_SLICES)),
        "slab_thickness_mean_mm": one(SPACING_BETWEEN_SLICES, UNIT_MM),
        "pixel_spacing_row_mm": one(VERTICAL_PIXEL_SPACING, UNIT_MM),
        "pixel_spacing_col_mm": one(HORIZONTAL_PIXEL_SPACING, UNIT_MM),
    }
    for key, length in (("abc2_a_mm", ABC2_A), ("abc2_b_mm", ABC2_B), ("abc2_c_mm", ABC2_C)):
        if (length.scheme_designator, length.value) in numbers:
            out[key] = one(length, UNIT_MM)
    predecessors = [
        str(instance.ReferencedSOPInstanceUID)
        for study in sr.get("PredecessorDocumentsSequence", [])
        for series in study.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    ]
    if predecessors:
        out["replaces_sop_instance_uid"] = predecessors[0]
    for key, concept in (
        ("algorithm_name", ("DCM", "111001")),
        ("algorithm_version", ("DCM", "111003")),
    ):
        values = texts.get(concept, [])
        if not values:
            raise ValueError(f"the SR has no {key.replace('_', ' ')}")
        out[key] = values[0]
    uidrefs = _references(sr)
    out.update(uidrefs)
    return out


def _texts_by_name(sr: pydicom.Dataset) -> dict[tuple[str, str], list[str]]:
    found: dict[tuple[str, str], list[str]] = {}

    def walk(items: Sequence[pydicom.Dataset]) -> None:
        for item in items:
            if item.get("ValueType") == "TEXT":
                name = item.ConceptNameCodeSequence[0]
                found.setdefault((str(name.CodingSchemeDesignator), str(name.CodeValue)), []).append(
                    str(item.TextValue)
                )
            walk(item.get("ContentSequence", []))

    walk(sr.get("ContentSequence", []))
    return found


def _references(sr: pydicom.Dataset) -> dict[str, str]:
    """The referenced SEG instance and the source series UID of the measurement group."""
    out: dict[str, str] = {}

    def walk(items: Sequence[pydicom.Dataset]) -> None:
        for item in items:
            name = item.ConceptNameCodeSequence[0] if "ConceptNameCodeSequence" in item else None
            code = (str(name.CodingSchemeDesignator), str(name.CodeValue)) if name is not None else None
            if item.get("ValueType") == "IMAGE" and code == ("DCM", "121191"):  # Referenced Segment
                out["segmentation_sop_instance_uid"] = str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            if item.get("ValueType") == "UIDREF" and code == ("DCM", "121232"):  # Source series for segmentation
                out["source_series_instance_uid"] = str(item.UID)
            walk(item.get("ContentSequence", []))

    walk(sr.get("ContentSequence", []))
    for key in ("segmentation_sop_instance_uid", "source_series_instance_uid"):
        if key not in out:
            raise ValueError(f"the SR has no {key.replace('_', ' ')}")
    return out
