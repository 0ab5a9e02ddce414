"""DIMSE C-STORE delivery (pynetdicom, the ``pacs`` extra): one association, one C-STORE per object."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

from worker.delivery.senders import TARGET_CSTORE, DeliveryError, DicomObject, SendReport, short_reason

#: C-STORE statuses that mean "stored" (success and the standard's warnings).
_CSTORE_OK = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


class CStoreSender:
    """DIMSE C-STORE (pynetdicom): one association, one C-STORE per instance.

    Each SOP class is proposed with Explicit and Implicit VR Little Endian. ``timeout_s``
    bounds the TCP connect, the association negotiation and each DIMSE response.
    """

    target = TARGET_CSTORE

    def __init__(
        self, *, host: str, port: int, called_aet: str, calling_aet: str = "ICHVOL", timeout_s: float = 60.0
    ) -> None:
        self.host = host
        self.port = int(port)
        self.called_aet = called_aet
        self.calling_aet = calling_aet
        self.timeout_s = timeout_s

    @property
    def destination(self) -> str:
        return f"{self.called_aet}@{self.host}:{self.port}"

    def send(self, objects: Sequence[DicomObject]) -> SendReport:
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
        from pynetdicom import AE

        if not objects:
            return SendReport(stored=())
        where = f"C-STORE {self.destination}"
        # Probe the port first: pynetdicom 3.0 leaks its socket when the TCP connect is
        # refused (it calls shutdown() before close() on an unconnected socket).
        try:
            socket.create_connection((self.host, self.port), timeout=self.timeout_s).close()
        except OSError as exc:
            raise DeliveryError(f"{where}: PACS unreachable ({exc.strerror or exc})", transient=True) from exc
        ae = AE(ae_title=self.calling_aet)
        ae.connection_timeout = self.timeout_s
        ae.acse_timeout = self.timeout_s
        ae.dimse_timeout = self.timeout_s
        ae.network_timeout = self.timeout_s
        for sop_class in dict.fromkeys(o.sop_class_uid for o in objects):
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        assoc = ae.associate(self.host, self.port, ae_title=self.called_aet)
        if not assoc.is_established:
            raise self._not_established(assoc, where)
        stored: list[str] = []
        warnings: list[str] = []
        try:
            for obj in objects:
                try:
                    status = assoc.send_c_store(obj.dataset)
                except ValueError as exc:  # no accepted presentation context for this SOP class
                    raise DeliveryError(
                        f"{where}: the PACS does not accept {obj.dataset.SOPClassUID.name} ({obj.kind})",
                        transient=False,
                    ) from exc
                except RuntimeError as exc:  # the association ended under us
                    raise DeliveryError(f"{where}: association lost ({short_reason(exc)})", transient=True) from exc
                code = int(status.Status) if "Status" in status else None
                if code is None:
                    raise DeliveryError(f"{where}: no answer to C-STORE of the {obj.kind}", transient=True)
                if code not in _CSTORE_OK:
                    transient = 0xA700 <= code <= 0xA7FF
                    raise DeliveryError(
                        f"{where}: C-STORE of the {obj.kind} failed with status 0x{code:04X}", transient=transient
                    )
                if code != 0x0000:
                    warnings.append(f"{obj.kind}: status 0x{code:04X}")
                stored.append(obj.sop_instance_uid)
        finally:
            if assoc.is_established:
                assoc.release()
        return SendReport(stored=tuple(stored), warnings=tuple(warnings))

    @staticmethod
    def _not_established(assoc: Any, where: str) -> DeliveryError:
        primitive = getattr(assoc.acceptor, "primitive", None)
        result = getattr(primitive, "result", None)
        if assoc.is_rejected and primitive is not None and result in (1, 2):
            reason = primitive.reason_str
            kind = "permanently" if result == 1 else "for now"
            return DeliveryError(f"{where}: association rejected {kind} ({reason})", transient=result == 2)
        if result == 0:  # accepted, but none of our SOP classes: aborted by us
            return DeliveryError(f"{where}: the PACS accepts none of the SOP classes sent", transient=False)
        return DeliveryError(f"{where}: PACS unreachable (no association)", transient=True)
