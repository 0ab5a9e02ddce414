"""The overlay picture as DICOM for a PACS: an RGB secondary capture in the CT's study.

``overlay.png`` (the contact sheet of :mod:`worker.outputs.overlay`) as one RGB Secondary
Capture image (8 bits per channel, ``(rows, columns, 3)``), burned-in annotation YES (the
picture holds the volumes and the disclaimer), for viewers that cannot show a SEG. Built
after the result is committed, from the stored ``seg.dcm`` and ``overlay.png`` (see
:mod:`worker.delivery.deliveries`); patient and study identity come from the SEG, and the
UIDs derive from the SEG's SOP Instance UID as the SR's do (:func:`worker.outputs.sr.derived_uid`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom

from worker.core.notices import DISCLAIMER
from worker.outputs.sr import MANUFACTURER, derived_uid

__all__ = ["OVERLAY_SERIES_DESCRIPTION", "build_overlay_sc", "read_png_rgb"]

OVERLAY_SERIES_DESCRIPTION = "ICH overlay (research use only)"
OVERLAY_SERIES_NUMBER = 903

UInt8Image = npt.NDArray[np.uint8]


def _orientation_letter(vector: Sequence[float]) -> str:
    """The DICOM patient-orientation letter of an LPS direction's dominant axis."""
    index = int(np.argmax(np.abs(np.asarray(vector, dtype=float))))
    positive, negative = ("L", "P", "H")[index], ("R", "A", "F")[index]
    return positive if vector[index] > 0 else negative


def _patient_orientation(seg: pydicom.Dataset) -> tuple[str, str]:
    """Row and column directions of the CT slices (from the SEG's plane orientation)."""
    try:
        plane = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
        cosines = [float(v) for v in plane.ImageOrientationPatient]
    except (AttributeError, IndexError, TypeError, ValueError):
        return ("L", "P")  # standard axial head CT
    return (_orientation_letter(cosines[:3]), _orientation_letter(cosines[3:]))


def read_png_rgb(path: Path) -> UInt8Image:
    """A PNG as ``(rows, columns, 3)`` uint8 RGB. Raises ``ValueError`` if unreadable."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{path} is not a readable image")
    rgb: UInt8Image = np.ascontiguousarray(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
    return rgb


def build_overlay_sc(*, seg: pydicom.Dataset, rgb: np.ndarray) -> hd.sc.SCImage:
    """The overlay picture as an RGB Secondary Capture in the SEG's study.

    ``rgb``: ``(rows, columns, 3)`` uint8, RGB order (:func:`read_png_rgb`). Patient
    orientation (row, column directions) is that of the CT slices, taken from the SEG.
    UIDs derive from the SEG's SOP Instance UID (a rebuild gives the same instance).
    """
    pixels = np.asarray(rgb)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"expected a (rows, columns, 3) uint8 RGB image, got {pixels.shape} {pixels.dtype}")
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=seg,
        pixel_array=np.ascontiguousarray(pixels),
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=derived_uid("overlay-series", str(seg.SOPInstanceUID)),
        series_number=OVERLAY_SERIES_NUMBER,
        sop_instance_uid=derived_uid("overlay", str(seg.SOPInstanceUID)),
        instance_number=1,
        manufacturer=MANUFACTURER,
        patient_orientation=_patient_orientation(seg),
        transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
    )
    sc.SeriesDescription = OVERLAY_SERIES_DESCRIPTION
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = DISCLAIMER
    return sc
