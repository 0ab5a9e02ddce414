"""What a sender is: the objects it sends, what it reports, how it fails.

A sender delivers :class:`DicomObject` instances to one target and raises
:class:`DeliveryError`, transient (retry later) or permanent (fix the cause, then
``ichvol redeliver``). The two senders are :class:`~worker.delivery.stow.StowSender`
(DICOMweb STOW-RS) and :class:`~worker.delivery.cstore.CStoreSender` (DIMSE C-STORE).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import pydicom

from worker.core.errors import IchvolError

TARGET_STOW = "stow"
TARGET_CSTORE = "cstore"


class DeliveryError(IchvolError):
    """Sending to a PACS failed. ``transient``: retry later; else fix the cause, then redeliver."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class DicomObject:
    """One instance to send: ``kind`` is ``"seg"``, ``"sr"`` or ``"overlay"``."""

    kind: str
    dataset: pydicom.Dataset

    @property
    def sop_instance_uid(self) -> str:
        return str(self.dataset.SOPInstanceUID)

    @property
    def sop_class_uid(self) -> str:
        return str(self.dataset.SOPClassUID)

    def part10(self) -> bytes:
        """The instance as a DICOM file (preamble, file meta, dataset)."""
        buffer = io.BytesIO()
        self.dataset.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

    def record(self) -> dict[str, str]:
        return {
            "kind": self.kind,
            "sop_class_uid": self.sop_class_uid,
            "sop_instance_uid": self.sop_instance_uid,
            "series_instance_uid": str(self.dataset.SeriesInstanceUID),
        }


@dataclass(frozen=True)
class SendReport:
    """What a target acknowledged: stored SOP Instance UIDs and any warnings."""

    stored: tuple[str, ...]
    warnings: tuple[str, ...] = ()


class Sender(Protocol):
    """Sends instances to one target; raises :class:`DeliveryError`."""

    @property
    def target(self) -> str: ...

    @property
    def destination(self) -> str: ...

    def send(self, objects: Sequence[DicomObject]) -> SendReport: ...


def short_reason(exc: BaseException) -> str:
    """The first line of an exception's message, at most 200 characters (for error messages)."""
    return (str(exc).splitlines() or [""])[0][:200]
