"""A PACS as the study source: find new head CTs by QIDO-RS, copy them by WADO-RS into the export bucket.

For sites without an S3 export. :func:`pacs_poll_once` is a bridge, not a second
scheduler: it copies each matching PACS study's CT instances into the export bucket as
``<ICHVOL_EXPORT_PREFIX>/pacs-<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``
and nothing else. The scheduler then treats the folder like any export, so the same
rules apply unchanged:

* stable-study rule: no marker is written, so a folder counts as complete once none of
  its objects changed for ``ICHVOL_QUIET_PERIOD_S``; a study still arriving in the PACS
  keeps gaining instances here and is not measured half-sent;
* fingerprints and idempotency: instances already in the bucket are not copied again
  (an unchanged study keeps its fingerprint, so the scheduler registers it once); an
  instance added later in the PACS changes the fingerprint, and the scheduler measures
  the new version, exactly as for a re-export.

Only series whose Modality is ``ICHVOL_PACS_SOURCE_MODALITY`` (CT) are copied. That also
keeps ichvol's own results (SR, SEG, OT series sent back to the same PACS) out of the
export, which would otherwise change the fingerprint after every delivery.

Which studies: QIDO-RS ``ModalitiesInStudy`` = the modality, ``StudyDate`` within the
last ``ICHVOL_PACS_SOURCE_LOOKBACK_H`` hours (whole days, the PACS's local dates), and,
when ``ICHVOL_PACS_SOURCE_DESCRIPTION`` is set, a StudyDescription containing one of its
words (case-insensitive).

:class:`DicomwebClient` is a minimal DICOMweb client (QIDO-RS JSON, WADO-RS
``multipart/related`` retrieval) on ``requests``; authentication as for delivery
(bearer token, else basic auth).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from worker.core.errors import ConfigurationError, IchvolError, TransientError
from worker.core.settings import Settings

log = logging.getLogger(__name__)

#: A DICOM UID: digits and dots, at most 64 characters. Anything else from the PACS is refused.
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
FOLDER_PREFIX = "pacs-"


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


# --------------------------------------------------------------------------------------------
# the bridge


@dataclass(frozen=True)
class PacsPollReport:
    """Counts of one PACS poll."""

    studies: int
    copied: int
    already_present: int
    skipped_series: int
    errors: int
    seconds: float

    def line(self) -> str:
        return (
            f"pacs-poll: {self.studies} studies, {self.copied} instances copied, {self.already_present} already "
            f"in the bucket, {self.skipped_series} series skipped (not the modality), {self.errors} errors, "
            f"{self.seconds:.2f} s"
        )


def study_folder(*, export_prefix: str, study_instance_uid: str) -> str:
    """The export-bucket folder of a PACS study (ends with ``/``)."""
    base = export_prefix.strip("/")
    return f"{base}/{FOLDER_PREFIX}{study_instance_uid}/" if base else f"{FOLDER_PREFIX}{study_instance_uid}/"


def _description_matches(description: str | None, words: Sequence[str]) -> bool:
    if not words:
        return True
    text = (description or "").lower()
    return any(word in text for word in words)


def study_query(settings: Settings, *, now: datetime) -> dict[str, str]:
    """QIDO-RS parameters: modality and a StudyDate range covering the lookback (whole days)."""
    since = (now - timedelta(hours=settings.pacs_source_lookback_h)).date()
    return {"ModalitiesInStudy": settings.pacs_source_modality, "StudyDate": f"{since:%Y%m%d}-"}


def _present_keys(store: Any, folder: str) -> set[str]:
    return {o.key for o in store.iter_objects(folder)}


def copy_study(*, client: DicomwebClient, store: Any, study: PacsStudy, settings: Settings) -> tuple[int, int, int]:
    """Copy the study's missing instances of matching series; returns (copied, present, skipped series)."""
    folder = study_folder(export_prefix=settings.export_prefix, study_instance_uid=study.study_instance_uid)
    present = _present_keys(store, folder)
    copied = already = skipped = 0
    for series_uid, modality in client.search_series(study.study_instance_uid):
        if (modality or "").upper() != settings.pacs_source_modality.upper():
            skipped += 1
            continue
        for instance in client.search_instances(study.study_instance_uid, series_uid):
            key = f"{folder}{series_uid}/{instance.sop_instance_uid}.dcm"
            if key in present:
                already += 1
                continue
            data = client.retrieve_instance(instance)
            store.put_bytes(key, data, content_type="application/dicom")
            copied += 1
    return copied, already, skipped


def pacs_poll_once(
    *, client: DicomwebClient, store: Any, settings: Settings, now: datetime | None = None
) -> PacsPollReport:
    """Find matching studies in the PACS and copy their new CT instances into the export bucket.

    A study that fails (PACS error on its series or instances) is counted and skipped;
    the next poll tries it again. Raises :class:`TransientError` when the study search
    itself fails for a reason that may pass.
    """
    started = time.perf_counter()
    now = now or datetime.now(UTC)
    words = [w.strip().lower() for w in (settings.pacs_source_description or "").split(",") if w.strip()]
    try:
        studies = client.search_studies(study_query(settings, now=now))
    except DicomwebError as exc:
        if exc.transient:
            raise TransientError(exc.message) from exc
        raise
    studies = [s for s in studies if _description_matches(s.description, words)]
    copied = already = skipped = errors = 0
    for study in studies:
        try:
            c, a, s = copy_study(client=client, store=store, study=study, settings=settings)
        except (DicomwebError, TransientError) as exc:
            errors += 1
            log.warning("PACS study not copied (will retry next poll): %s", exc.message)
            continue
        copied, already, skipped = copied + c, already + a, skipped + s
    report = PacsPollReport(
        studies=len(studies),
        copied=copied,
        already_present=already,
        skipped_series=skipped,
        errors=errors,
        seconds=round(time.perf_counter() - started, 3),
    )
    log.info(report.line())
    return report


def run_pacs_poll(settings: Settings, *, once: bool = False, stop: threading.Event | None = None) -> int:
    """``ichvol pacs-poll``: the bridge, once or every ``ICHVOL_POLL_INTERVAL_S``."""
    from worker.infra import storage

    if not settings.pacs_source_url:
        raise ConfigurationError("ICHVOL_PACS_SOURCE_URL is empty: no PACS to poll")
    stop = stop or threading.Event()
    client = DicomwebClient.from_settings(settings, url=settings.pacs_source_url)
    store = storage.open_store(settings.export_bucket, settings)
    try:
        while True:
            try:
                report = pacs_poll_once(client=client, store=store, settings=settings)
                if once:
                    print(report.line())
                    return 0 if report.errors == 0 else 1
            except (TransientError, DicomwebError) as exc:
                log.warning("PACS poll failed, will retry: %s", exc.message)
                if once:
                    print(f"ichvol pacs-poll: {exc.message}")
                    return 1
            if stop.wait(settings.poll_interval_s):
                return 0
    finally:
        client.close()
