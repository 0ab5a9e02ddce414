"""Results to the reading room: the SEG, the volume SR and the overlay sent to a PACS, retried.

Delivery is a separate step after the result is committed, so a PACS outage never loses
a result. The plain functions here are called by the Celery task ``ichvol.deliver``
(:mod:`worker.tasks.deliver`), by ``ichvol redeliver`` and by the embedded runner.

State machine (table ``deliveries``, one row per (run, target))::

    pending --sent--------------------------------> sent
    pending --transient error, attempts < max-----> pending (the task retries with backoff)
    pending --transient error, attempts >= max----> failed
    pending --permanent error---------------------> failed
    failed  --ichvol redeliver--------------------> pending (attempts start again at 0)

Transient: the PACS cannot be reached, times out, answers HTTP 408/429/5xx, rejects an
association "transient", or reports "out of resources" (0xA7xx) for an instance.
Permanent: credentials refused (401/403), no such endpoint (404), the PACS refuses an
object (HTTP 400/409/413/415, C-STORE failure statuses other than 0xA7xx, SOP class not
accepted), the association is rejected "permanent" (unknown AE titles), TLS
verification fails, or a stored artefact is missing. Waiting does not fix those; after
the cause is fixed ``ichvol redeliver`` resends.

What is sent, in order (each optional, ``ICHVOL_PACS_SEND_*``): the SEG (``seg.dcm``
from the results store, unchanged), the TID 1500 SR built from the ``results`` row
(:func:`worker.outputs.sr.build_volume_sr`), the overlay as a Secondary Capture
(:func:`worker.outputs.secondary_capture.build_overlay_sc`). The SR and overlay UIDs derive from the SEG's, so a
resend replaces rather than duplicates them. Sending the same instance twice is
harmless: PACSs store an instance once per SOP Instance UID.

Two deliveries of the same run may run at once (a redelivered message and a retry):
both send the same instances, and the row records the last outcome.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import socket
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote, urlsplit

import pydicom
from sqlalchemy import select, update

from worker.core.errors import ConfigurationError, IchvolError, TransientError
from worker.core.settings import Settings
from worker.infra import db
from worker.infra.tables import Delivery, DeliveryState, Result, Run

if TYPE_CHECKING:
    from worker.outputs.sr import VolumeReport

log = logging.getLogger(__name__)

#: Celery task name of a delivery (sent by name, so senders need not import the task module).
TASK_DELIVER = "ichvol.deliver"
TARGET_STOW = "stow"
TARGET_CSTORE = "cstore"
KIND_SEG = "seg"
KIND_SR = "sr"
KIND_OVERLAY = "overlay"

#: C-STORE statuses that mean "stored" (success and the standard's warnings).
_CSTORE_OK = frozenset({0x0000, 0xB000, 0xB006, 0xB007})
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


# --------------------------------------------------------------------------------------------
# DICOMweb STOW-RS


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
            raise DeliveryError(f"{where}: TLS verification failed ({_short(exc)})", transient=False) from exc
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise DeliveryError(f"{where}: PACS unreachable ({type(exc).__name__})", transient=True) from exc
        except requests.RequestException as exc:
            raise DeliveryError(f"{where}: request failed ({_short(exc)})", transient=False) from exc
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


def _short(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0][:200]


# --------------------------------------------------------------------------------------------
# DIMSE C-STORE


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
                    raise DeliveryError(f"{where}: association lost ({_short(exc)})", transient=True) from exc
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


# --------------------------------------------------------------------------------------------
# configuration


def _require(module: str, target: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ConfigurationError(
            f"ICHVOL_PACS_DELIVERY names {target!r}, which needs the {module!r} package: pip install 'ichvol[pacs]'"
        )


def senders_from_settings(settings: Settings) -> list[Sender]:
    """One sender per target named by ``ICHVOL_PACS_DELIVERY`` (none when it is empty).

    Raises :class:`ConfigurationError` when a target's client library is not installed.
    """
    senders: list[Sender] = []
    for target in settings.pacs_targets:
        _require("requests" if target == TARGET_STOW else "pynetdicom", target)
        if target == TARGET_STOW:
            assert settings.pacs_stow_url is not None  # Settings checks it
            verify: bool | str = settings.pacs_ca_bundle or settings.pacs_verify_tls
            senders.append(
                StowSender(
                    url=settings.pacs_stow_url,
                    token=settings.pacs_token,
                    username=settings.pacs_username,
                    password=settings.pacs_password,
                    timeout_s=settings.pacs_timeout_s,
                    verify=verify if settings.pacs_verify_tls else False,
                )
            )
        elif target == TARGET_CSTORE:
            assert settings.pacs_cstore_host is not None
            senders.append(
                CStoreSender(
                    host=settings.pacs_cstore_host,
                    port=settings.pacs_cstore_port,
                    called_aet=settings.pacs_cstore_called_aet,
                    calling_aet=settings.pacs_cstore_calling_aet,
                    timeout_s=settings.pacs_timeout_s,
                )
            )
    return senders


def delivery_configured(settings: Settings) -> bool:
    return bool(settings.pacs_targets)


@dataclass(frozen=True)
class DeliveryDeps:
    """What delivery needs: settings, a session factory and the results store."""

    settings: Settings
    sessions: Any  # sqlalchemy.orm.sessionmaker
    results_store: Any  # worker.infra.object_store.ObjectStore

    @classmethod
    def from_settings(cls, settings: Settings) -> DeliveryDeps:
        from worker.infra import storage

        return cls(
            settings=settings,
            sessions=db.session_factory(db.make_engine(settings.database_url)),
            results_store=storage.open_store(settings.results_bucket, settings),
        )


# --------------------------------------------------------------------------------------------
# building the objects


def store_key(store: Any, uri: str) -> str:
    """The key of ``uri`` (as returned by ``store.upload_file``) in ``store``.

    ``s3://bucket/key`` -> ``key``; ``file:///root/key`` -> ``key`` relative to the
    local store's root. Raises :class:`DeliveryError` (permanent) for another bucket.
    """
    parts = urlsplit(uri)
    if parts.scheme == "s3" and parts.netloc == getattr(store, "bucket", None):
        return unquote(parts.path.lstrip("/"))
    root = getattr(store, "root", None)
    if parts.scheme == "file" and root is not None:
        path = Path(unquote(parts.path))
        try:
            return path.relative_to(Path(root)).as_posix()
        except ValueError:
            pass
    raise DeliveryError(f"artefact {uri} is not in the results store {store!r}", transient=False)


def _download(deps: DeliveryDeps, uri: str | None, dest: Path, what: str) -> Path:
    from worker.infra.object_store import StorageError

    if not uri:
        raise DeliveryError(f"the result has no {what}", transient=False)
    try:
        deps.results_store.download(store_key(deps.results_store, uri), dest)
    except StorageError as exc:  # missing or forbidden; TransientError passes through
        raise DeliveryError(f"cannot read the {what} ({exc.message})", transient=False) from exc
    return dest


def report_of(result: Result, run: Run) -> VolumeReport:
    """The SR's numbers from a results row and its run."""
    from worker.outputs.sr import VolumeReport

    return VolumeReport(
        volume_ml=float(result.volume_ml),
        abc2_ml=float(result.abc2_ml),
        n_slices=int(result.n_slices),
        pixel_spacing_mm=(float(result.pixel_spacing_row_mm), float(result.pixel_spacing_col_mm)),
        slab_thickness_mean_mm=float(result.slab_thickness_mean_mm),
        series_instance_uid=str(result.series_instance_uid),
        model_name=str(run.model_name),
        model_version=str(run.model_version),
        model_sha256=str(run.model_sha256 or ""),
    )


def build_objects(*, result: Result, run: Run, deps: DeliveryDeps, work_dir: Path) -> list[DicomObject]:
    """SEG, SR and overlay SC of one result, as the settings ask (order: SEG, SR, overlay).

    Reads ``seg.dcm`` (and ``overlay.png``) from the results store into ``work_dir``.
    Raises :class:`DeliveryError` (permanent) for a missing or unreadable artefact and
    :class:`TransientError` for storage trouble that may pass.
    """
    from worker.outputs import secondary_capture, sr

    settings = deps.settings
    seg_path = _download(deps, result.seg_uri, work_dir / "seg.dcm", "DICOM SEG (seg.dcm)")
    try:
        seg = pydicom.dcmread(seg_path)
    except (pydicom.errors.InvalidDicomError, OSError, ValueError) as exc:
        raise DeliveryError(f"the stored seg.dcm is not readable DICOM ({_short(exc)})", transient=False) from exc
    objects: list[DicomObject] = []
    if settings.pacs_send_seg:
        objects.append(DicomObject(KIND_SEG, seg))
    if settings.pacs_send_sr:
        try:
            objects.append(DicomObject(KIND_SR, sr.build_volume_sr(seg=seg, report=report_of(result, run))))
        except ValueError as exc:
            raise DeliveryError(f"the SR could not be built: {exc}", transient=False) from exc
    if settings.pacs_send_overlay:
        png = _download(deps, result.overlay_uri, work_dir / "overlay.png", "overlay picture (overlay.png)")
        try:
            rgb = secondary_capture.read_png_rgb(png)
            objects.append(DicomObject(KIND_OVERLAY, secondary_capture.build_overlay_sc(seg=seg, rgb=rgb)))
        except ValueError as exc:
            raise DeliveryError(f"the overlay could not be converted: {exc}", transient=False) from exc
    return objects


# --------------------------------------------------------------------------------------------
# the state machine


@dataclass(frozen=True)
class DeliveryOutcome:
    """One delivery after an attempt (or untouched): its row's state and counts."""

    delivery_id: int
    run_id: int
    target: str
    destination: str
    state: str
    attempts: int
    error: str | None = None
    instances: tuple[str, ...] = ()


def _now() -> datetime:
    return datetime.now(UTC)


def create_deliveries(sessions: Any, *, run_id: int, senders: Sequence[Sender]) -> int:
    """Insert a ``pending`` row per target for the run's result (idempotent).

    Returns how many of the run's deliveries to these targets are ``pending`` now. A run
    without a result (not succeeded) gets no rows.
    """
    with db.transaction(sessions) as session:
        result_id = session.scalar(select(Result.id).where(Result.run_id == run_id))
        if result_id is None or not senders:
            return 0
        rows = [
            {
                "run_id": run_id,
                "result_id": int(result_id),
                "target": sender.target,
                "destination": sender.destination,
                "state": DeliveryState.PENDING,
                "attempts": 0,
                "updated_at": _now(),
            }
            for sender in senders
        ]
        db.insert_ignore(session, Delivery, rows, conflict_columns=["run_id", "target"])
        pending = session.scalars(
            select(Delivery.id).where(
                Delivery.run_id == run_id,
                Delivery.state == DeliveryState.PENDING,
                Delivery.target.in_([s.target for s in senders]),
            )
        ).all()
        return len(pending)


def _record(
    sessions: Any,
    *,
    delivery_id: int,
    state: DeliveryState,
    error: str | None,
    objects: Sequence[DicomObject],
    sent: bool,
) -> None:
    now = _now()
    values: dict[str, Any] = {
        "state": state,
        "attempts": Delivery.attempts + 1,
        "last_error": None if error is None else error[:2000],
        "last_attempt_at": now,
        "updated_at": now,
        "instances": [o.record() for o in objects],
    }
    if sent:
        values["sent_at"] = now
    with db.transaction(sessions) as session:
        session.execute(update(Delivery).where(Delivery.id == delivery_id).values(**values))


def _fail_all(sessions: Any, delivery_ids: Sequence[int], message: str) -> None:
    with db.transaction(sessions) as session:
        session.execute(
            update(Delivery)
            .where(Delivery.id.in_(delivery_ids))
            .values(
                state=DeliveryState.FAILED,
                attempts=Delivery.attempts + 1,
                last_error=message[:2000],
                last_attempt_at=_now(),
                updated_at=_now(),
            )
        )


def _outcomes(sessions: Any, run_id: int) -> list[DeliveryOutcome]:
    with sessions() as session:
        rows = session.scalars(select(Delivery).where(Delivery.run_id == run_id).order_by(Delivery.id)).all()
    return [
        DeliveryOutcome(
            delivery_id=r.id,
            run_id=r.run_id,
            target=r.target,
            destination=r.destination,
            state=str(r.state.value),
            attempts=r.attempts,
            error=r.last_error,
            instances=tuple(i["sop_instance_uid"] for i in (r.instances or [])),
        )
        for r in rows
    ]


def deliver_run(*, run_id: int, deps: DeliveryDeps, senders: Sequence[Sender] | None = None) -> list[DeliveryOutcome]:
    """Send the run's result to every configured target whose delivery is ``pending``.

    Creates the rows if needed, builds the objects once, sends to each pending target and
    records each attempt (state, attempts, error, instances). A transient failure leaves
    the row ``pending`` until ``ICHVOL_PACS_MAX_ATTEMPTS`` attempts were made, then
    ``failed``; a permanent one makes it ``failed`` at once. Raises
    :class:`TransientError` when a row is still ``pending`` afterwards (the caller retries
    with backoff); returns every delivery row of the run otherwise. A run without a
    result returns ``[]``.
    """
    settings = deps.settings
    senders = list(senders_from_settings(settings) if senders is None else senders)
    if not senders:
        return []
    create_deliveries(deps.sessions, run_id=run_id, senders=senders)
    with db.map_db_errors(), deps.sessions() as session:
        pending = session.scalars(
            select(Delivery).where(Delivery.run_id == run_id, Delivery.state == DeliveryState.PENDING)
        ).all()
        result = session.scalar(select(Result).where(Result.run_id == run_id))
        run = session.get(Run, run_id)
    by_target = {s.target: s for s in senders}
    pending = [d for d in pending if d.target in by_target]
    if not pending or result is None or run is None:
        return _outcomes(deps.sessions, run_id)
    Path(settings.work_dir).mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"deliver-{run_id}-", dir=settings.work_dir))
    try:
        retry_later: list[str] = []
        try:
            objects = build_objects(result=result, run=run, deps=deps, work_dir=scratch)
        except DeliveryError as exc:
            log.warning("run %s: nothing can be delivered: %s", run_id, exc.message)
            _fail_all(deps.sessions, [d.id for d in pending], exc.message)
            return _outcomes(deps.sessions, run_id)
        except TransientError as exc:  # the results store is unavailable: an attempt for each target
            error = DeliveryError(f"results store unavailable: {exc.message}", transient=True)
            retry_later = [m for d in pending if (m := _after_failure(deps, d, error, objects=[])) is not None]
        else:
            for delivery in pending:
                message = _attempt(deps, delivery, by_target[delivery.target], objects)
                if message is not None:
                    retry_later.append(message)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if retry_later:
        raise TransientError("; ".join(retry_later))
    return _outcomes(deps.sessions, run_id)


def _attempt(deps: DeliveryDeps, delivery: Delivery, sender: Sender, objects: Sequence[DicomObject]) -> str | None:
    """One send to one target, recorded. Returns the error if the delivery stays pending."""
    try:
        report = sender.send(objects)
    except DeliveryError as exc:
        return _after_failure(deps, delivery, exc, objects=objects)
    note = "; ".join(report.warnings) or None
    _record(deps.sessions, delivery_id=delivery.id, state=DeliveryState.SENT, error=note, objects=objects, sent=True)
    log.info("delivery %s: %d instances sent to %s", delivery.id, len(objects), sender.destination)
    return None


def _after_failure(
    deps: DeliveryDeps, delivery: Delivery, error: DeliveryError, *, objects: Sequence[DicomObject]
) -> str | None:
    """Record a failed attempt: ``pending`` if it may pass and attempts remain (returns the error), else ``failed``."""
    attempts = delivery.attempts + 1
    if error.transient and attempts < deps.settings.pacs_max_attempts:
        log.warning("delivery %s (%s): %s; will retry", delivery.id, delivery.target, error.message)
        _record(
            deps.sessions,
            delivery_id=delivery.id,
            state=DeliveryState.PENDING,
            error=error.message,
            objects=objects,
            sent=False,
        )
        return error.message
    message = error.message if not error.transient else f"gave up after {attempts} attempts: {error.message}"
    log.error("delivery %s (%s) failed: %s", delivery.id, delivery.target, message)
    _record(
        deps.sessions, delivery_id=delivery.id, state=DeliveryState.FAILED, error=message, objects=objects, sent=False
    )
    return None


def requeue(sessions: Any, *, states: Sequence[str] = ("failed",), run_id: int | None = None) -> list[int]:
    """Make the matching deliveries ``pending`` again with ``attempts`` at 0; returns their run ids.

    ``states``: which deliveries to resend (``failed``, ``pending``, ``sent``).
    """
    wanted = [DeliveryState(s) for s in states]
    with db.transaction(sessions) as session:
        statement = update(Delivery).where(Delivery.state.in_(wanted))
        if run_id is not None:
            statement = statement.where(Delivery.run_id == run_id)
        rows = session.execute(
            statement.values(state=DeliveryState.PENDING, attempts=0, updated_at=_now()).returning(Delivery.run_id)
        ).all()
    return sorted({int(r.run_id) for r in rows})


def summary_json(outcomes: Sequence[DeliveryOutcome]) -> str:
    """Outcomes as a JSON list (for logs and the command line)."""
    return json.dumps([o.__dict__ for o in outcomes], default=str)


def deliver_in_process(worker_deps: Any, *, run_ids: Sequence[int]) -> list[DeliveryOutcome]:
    """The embedded default's delivery: one attempt per run, right after processing.

    ``worker_deps``: a :class:`worker.overnight.runtime.WorkerDeps`. Deliveries that meet transient
    trouble stay ``pending`` (``ichvol redeliver --state pending`` sends them later).
    """
    deps = DeliveryDeps(
        settings=worker_deps.settings, sessions=worker_deps.sessions, results_store=worker_deps.results_store
    )
    outcomes: list[DeliveryOutcome] = []
    for run_id in run_ids:
        try:
            outcomes.extend(deliver_run(run_id=run_id, deps=deps))
        except TransientError as exc:
            log.warning("run %s: delivery pending (%s)", run_id, exc.message)
            outcomes.extend(_outcomes(deps.sessions, run_id))
    return outcomes
