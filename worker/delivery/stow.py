"""DICOMweb STOW-RS delivery: every object in one ``multipart/related`` POST.

The HTTP session (authentication, TLS) is the one the PACS source uses
(:func:`worker.delivery.dicomweb.dicomweb_session`); ``requests`` comes with the ``pacs`` extra.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from worker.delivery.senders import TARGET_STOW, DeliveryError, DicomObject, SendReport, short_reason

#: HTTP statuses that may pass by waiting.
_HTTP_TRANSIENT = frozenset({408, 425, 429, 500, 502, 503, 504})
_HTTP_REASONS = {
    400: "the PACS could not read the request",
    401: "the PACS refused the credentials (check ICHVOL_PACS_TOKEN or _USERNAME/_PASSWORD)",
    403: "the PACS does not allow these credentials to store",
    404: "no STOW-RS service at this URL (check ICHVOL_PACS_STOW_URL)",
    409: "the PACS refused the instances",
    413: "the PACS refused the request as too large",
    415: "the PACS does not accept application/dicom",
}


def _first_value(item: dict[str, Any], tag: str) -> Any:
    values = item.get(tag, {}).get("Value") or [None]
    return values[0]


def _failures(body: dict[str, Any]) -> list[tuple[str, int | None]]:
    """``(SOP Instance UID, FailureReason)`` from a STOW-RS response's FailedSOPSequence."""
    items = body.get("00081198", {}).get("Value") or []
    return [(str(_first_value(i, "00081155")), _first_value(i, "00081197")) for i in items]


def _stored(body: dict[str, Any]) -> list[str]:
    items = body.get("00081199", {}).get("Value") or []
    return [str(_first_value(i, "00081155")) for i in items]


class StowSender:
    """DICOMweb STOW-RS: one ``POST <url>/studies`` of ``multipart/related; type="application/dicom"``.

    Authentication: ``token`` as ``Authorization: Bearer``, else ``username``/``password``
    as HTTP basic auth, else none. ``verify``: True, False or a CA bundle path.
    """

    target = TARGET_STOW

    def __init__(
        self,
        *,
        url: str,
        token: str | None = None,
        username: str | None = None,
        password: str | None = None,
        timeout_s: float = 60.0,
        verify: bool | str = True,
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.verify = verify
        self._token = token
        self._username = username
        self._password = password

    @property
    def destination(self) -> str:
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{host}{port}{parts.path}"  # no user:password@ even if the URL had one

    def _session(self) -> Any:
        from worker.delivery.dicomweb import dicomweb_session

        return dicomweb_session(token=self._token, username=self._username, password=self._password, verify=self.verify)

    def send(self, objects: Sequence[DicomObject]) -> SendReport:
        import requests

        if not objects:
            return SendReport(stored=())
        boundary = uuid.uuid4().hex
        parts = []
        for obj in objects:
            parts.append(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
            parts.append(obj.part10())
            parts.append(b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        }
        where = f"STOW-RS {self.destination}"
        try:
            with self._session() as session:
                response = session.post(
                    f"{self.url}/studies", data=b"".join(parts), headers=headers, timeout=self.timeout_s
                )
        except requests.exceptions.SSLError as exc:
            raise DeliveryError(f"{where}: TLS verification failed ({short_reason(exc)})", transient=False) from exc
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise DeliveryError(f"{where}: PACS unreachable ({type(exc).__name__})", transient=True) from exc
        except requests.RequestException as exc:
            raise DeliveryError(f"{where}: request failed ({short_reason(exc)})", transient=False) from exc
        return self._report(response, objects, where)

    def _report(self, response: Any, objects: Sequence[DicomObject], where: str) -> SendReport:
        status = int(response.status_code)
        try:
            body = response.json() if response.content else {}
        except ValueError:
            body = {}
        body = body if isinstance(body, dict) else {}
        failures = _failures(body)
        if status in _HTTP_TRANSIENT:
            raise DeliveryError(f"{where}: HTTP {status}, retry later", transient=True)
        if failures:
            transient = all(reason is not None and 0xA700 <= int(reason) <= 0xA7FF for _, reason in failures)
            listed = ", ".join(f"{uid} (0x{int(r):04X})" if r is not None else uid for uid, r in failures)
            raise DeliveryError(f"{where}: HTTP {status}, the PACS refused {listed}", transient=transient)
        if status not in (200, 202):
            reason = _HTTP_REASONS.get(status, "unexpected answer")
            raise DeliveryError(f"{where}: HTTP {status}, {reason}", transient=False)
        stored = _stored(body)
        expected = {o.sop_instance_uid for o in objects}
        warnings = () if not stored or expected <= set(stored) else (f"acknowledged {len(stored)} of {len(expected)}",)
        return SendReport(stored=tuple(o.sop_instance_uid for o in objects), warnings=warnings)
