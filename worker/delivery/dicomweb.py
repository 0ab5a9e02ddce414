"""A minimal DICOMweb client and the HTTP session every PACS request uses.

:class:`DicomwebClient` speaks QIDO-RS (JSON) and WADO-RS (``multipart/related``
retrieval) for the PACS source (:mod:`worker.delivery.pacs_source`);
:func:`dicomweb_session` is the ``requests`` session of both the client and the STOW-RS
sender (:mod:`worker.delivery.stow`): a bearer token, else HTTP basic auth, and the TLS
setting. ``requests`` comes with the ``pacs`` extra and is imported when a session is made.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from worker.core.errors import IchvolError
from worker.core.settings import Settings

log = logging.getLogger(__name__)

#: A DICOM UID: digits and dots, at most 64 characters. Anything else from the PACS is refused.
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class DicomwebError(IchvolError):
    """A DICOMweb request failed (``transient``: may pass by waiting)."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


def _value(item: dict[str, Any], tag: str) -> Any:
    values = item.get(tag, {}).get("Value") or [None]
    return values[0]


def _text(item: dict[str, Any], tag: str) -> str | None:
    value = _value(item, tag)
    if value is None:
        return None
    if isinstance(value, dict):  # PN
        return str(value.get("Alphabetic", ""))
    return str(value)


def is_uid(text: str | None) -> bool:
    return bool(text) and len(str(text)) <= 64 and bool(_UID.match(str(text)))


def split_multipart(body: bytes, content_type: str) -> list[bytes]:
    """The part bodies of a ``multipart/related`` response (RFC 2046), in order.

    Raises :class:`DicomwebError` (permanent) when the content type names no boundary.
    """
    match = re.search(r'boundary="?([^";]+)"?', content_type, flags=re.I)
    if not match or not content_type.lower().startswith("multipart/"):
        raise DicomwebError(f"expected a multipart response, got {content_type!r}", transient=False)
    delimiter = b"--" + match.group(1).strip().encode()
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break  # the close delimiter
        _headers, sep, payload = chunk.partition(b"\r\n\r\n")
        if not sep:
            continue
        if payload.endswith(b"\r\n"):
            payload = payload[:-2]
        parts.append(payload)
    return parts


@dataclass(frozen=True)
class PacsStudy:
    """A study as QIDO-RS lists it (no patient data kept)."""

    study_instance_uid: str
    description: str | None
    study_date: str | None
    n_instances: int | None


@dataclass(frozen=True)
class PacsInstance:
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str


def dicomweb_session(*, token: str | None, username: str | None, password: str | None, verify: bool | str) -> Any:
    """A ``requests.Session`` for a DICOMweb server: bearer token if given, else HTTP basic
    auth if a user name is given; ``verify`` is ``requests``' TLS setting (a CA bundle path,
    True or False)."""
    import requests

    session = requests.Session()
    session.verify = verify
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    elif username:
        session.auth = (username, password or "")
    return session


class DicomwebClient:
    """QIDO-RS and WADO-RS against one DICOMweb root (``url`` without a trailing ``/``)."""

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
        self.session = dicomweb_session(token=token, username=username, password=password, verify=verify)

    @classmethod
    def from_settings(cls, settings: Settings, *, url: str) -> DicomwebClient:
        verify: bool | str = (settings.pacs_ca_bundle or True) if settings.pacs_verify_tls else False
        return cls(
            url=url,
            token=settings.pacs_token,
            username=settings.pacs_username,
            password=settings.pacs_password,
            timeout_s=settings.pacs_timeout_s,
            verify=verify,
        )

    def close(self) -> None:
        self.session.close()

    def _get(self, path: str, *, params: list[tuple[str, str]] | None = None, accept: str) -> Any:
        import requests

        where = f"DICOMweb {self.url}{path}"
        try:
            response = self.session.get(
                f"{self.url}{path}", params=params, headers={"Accept": accept}, timeout=self.timeout_s
            )
        except requests.exceptions.SSLError as exc:
            raise DicomwebError(f"{where}: TLS verification failed", transient=False) from exc
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise DicomwebError(f"{where}: PACS unreachable ({type(exc).__name__})", transient=True) from exc
        if response.status_code in (408, 429) or response.status_code >= 500:
            raise DicomwebError(f"{where}: HTTP {response.status_code}", transient=True)
        if response.status_code == 204:
            return None
        if response.status_code != 200:
            raise DicomwebError(f"{where}: HTTP {response.status_code}", transient=False)
        return response

    def _json(self, path: str, params: list[tuple[str, str]] | None = None) -> list[dict[str, Any]]:
        response = self._get(path, params=params, accept="application/dicom+json")
        if response is None:
            return []
        try:
            data = response.json()
        except ValueError as exc:
            raise DicomwebError(f"DICOMweb {path}: the answer is not JSON", transient=False) from exc
        return [item for item in data if isinstance(item, dict)] if isinstance(data, list) else []

    def search_studies(self, params: dict[str, str]) -> list[PacsStudy]:
        """QIDO-RS ``/studies`` with ``params`` (attribute keywords or tags as keys)."""
        # One includefield per attribute: some servers (Orthanc's plugin) ignore comma lists.
        query = [("includefield", "StudyDescription"), ("includefield", "NumberOfStudyRelatedInstances")]
        query += list(params.items())
        studies = []
        for item in self._json("/studies", query):
            uid = _text(item, "0020000D")
            if not is_uid(uid):
                continue
            count = _value(item, "00201208")
            studies.append(
                PacsStudy(
                    study_instance_uid=str(uid),
                    description=_text(item, "00081030"),
                    study_date=_text(item, "00080020"),
                    n_instances=None if count is None else int(count),
                )
            )
        return studies

    def search_series(self, study_instance_uid: str) -> list[tuple[str, str | None]]:
        """``(SeriesInstanceUID, Modality)`` of each series of the study."""
        rows = []
        for item in self._json(f"/studies/{study_instance_uid}/series"):
            uid = _text(item, "0020000E")
            if is_uid(uid):
                rows.append((str(uid), _text(item, "00080060")))
        return rows

    def search_instances(self, study_instance_uid: str, series_instance_uid: str) -> list[PacsInstance]:
        rows = []
        for item in self._json(f"/studies/{study_instance_uid}/series/{series_instance_uid}/instances"):
            uid = _text(item, "00080018")
            if is_uid(uid):
                rows.append(PacsInstance(study_instance_uid, series_instance_uid, str(uid)))
        return rows

    def retrieve_instance(self, instance: PacsInstance) -> bytes:
        """WADO-RS: one instance as a DICOM file, in the PACS's stored transfer syntax."""
        path = (
            f"/studies/{instance.study_instance_uid}/series/{instance.series_instance_uid}"
            f"/instances/{instance.sop_instance_uid}"
        )
        response = self._get(path, accept='multipart/related; type="application/dicom"; transfer-syntax=*')
        if response is None:
            raise DicomwebError(f"DICOMweb {path}: no content", transient=False)
        parts = split_multipart(response.content, response.headers.get("Content-Type", ""))
        if len(parts) != 1:
            raise DicomwebError(f"DICOMweb {path}: expected one instance, got {len(parts)}", transient=False)
        return parts[0]

    def retrieve_study(self, study_instance_uid: str) -> list[bytes]:
        """WADO-RS: every instance of a study (for small studies and tests)."""
        response = self._get(
            f"/studies/{study_instance_uid}", accept='multipart/related; type="application/dicom"; transfer-syntax=*'
        )
        return [] if response is None else split_multipart(response.content, response.headers.get("Content-Type", ""))
