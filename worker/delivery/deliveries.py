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

A study measured again (another model version, an adapted model) gets a new SR that names
the one it replaces (:func:`find_predecessor`: the SR of the latest earlier result of the
same StudyInstanceUID that was sent) in its Predecessor Documents Sequence; the new
delivery rows record ``predecessor_sr_uid`` and ``replaces_delivery_id``.

Two deliveries of the same run may run at once (a redelivered message and a retry):
both send the same instances, and the row records the last outcome.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from worker.core.errors import ConfigurationError, TransientError
from worker.core.settings import Settings
from worker.delivery.cstore import CStoreSender
from worker.delivery.objects import KIND_SR, build_objects
from worker.delivery.senders import TARGET_CSTORE, TARGET_STOW, DeliveryError, DicomObject, Sender
from worker.delivery.stow import StowSender
from worker.infra import db
from worker.infra.object_store import ObjectStore
from worker.infra.tables import Delivery, DeliveryState, Result, Run, Study
from worker.outputs.sr import PredecessorSr

log = logging.getLogger(__name__)

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
    sessions: sessionmaker[Session]
    results_store: ObjectStore

    @classmethod
    def from_settings(cls, settings: Settings) -> DeliveryDeps:
        from worker.infra import storage

        return cls(
            settings=settings,
            sessions=db.session_factory(db.make_engine(settings.database_url)),
            results_store=storage.open_store(settings.results_bucket, settings),
        )


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


def create_deliveries(sessions: sessionmaker[Session], *, run_id: int, senders: Sequence[Sender]) -> int:
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
    sessions: sessionmaker[Session],
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


def _fail_all(sessions: sessionmaker[Session], delivery_ids: Sequence[int], message: str) -> None:
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


def _outcomes(sessions: sessionmaker[Session], run_id: int) -> list[DeliveryOutcome]:
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


@dataclass(frozen=True)
class Predecessor:
    """The earlier SR a run's SR replaces and the deliveries that sent it (``{target: delivery id}``)."""

    sr: PredecessorSr
    deliveries: dict[str, int]

    def delivery_for(self, target: str) -> int:
        """The delivery a new one to ``target`` replaces: the same target's, else the first that sent the SR."""
        return self.deliveries.get(target, min(self.deliveries.values()))


def find_predecessor(session: Session, *, run: Run, result: Result) -> Predecessor | None:
    """The SR that ``result``'s SR replaces, if any.

    Among the earlier results (by id: ids grow in the order results are written) of studies
    with the same StudyInstanceUID, the latest whose SR was sent (a ``sent`` delivery listing
    an ``sr`` instance). A study without a StudyInstanceUID has none. Not by ``created_at``:
    SQLite's server default has whole seconds and compares as text against the microseconds
    of a bound value, so two results in one second came out both "earlier" than each other.
    """
    study_uid = session.scalar(select(Study.study_instance_uid).where(Study.id == run.study_id))
    if not study_uid:
        return None
    earlier = Result.id < result.id
    rows = session.execute(
        select(Delivery.id, Delivery.target, Delivery.instances, Delivery.result_id)
        .join(Result, Result.id == Delivery.result_id)
        .join(Run, Run.id == Delivery.run_id)
        .join(Study, Study.id == Run.study_id)
        .where(Study.study_instance_uid == study_uid, Delivery.state == DeliveryState.SENT, earlier)
        .order_by(Result.id.desc(), Delivery.id)
    ).all()
    found: PredecessorSr | None = None
    deliveries: dict[str, int] = {}
    for row in rows:
        srs = [i for i in row.instances or [] if i.get("kind") == KIND_SR]
        if not srs:
            continue
        if found is None:
            sr = srs[0]
            found = PredecessorSr(
                study_instance_uid=str(study_uid),
                series_instance_uid=str(sr["series_instance_uid"]),
                sop_instance_uid=str(sr["sop_instance_uid"]),
                sop_class_uid=str(sr["sop_class_uid"]),
            )
        if any(i["sop_instance_uid"] == found.sop_instance_uid for i in srs):
            deliveries.setdefault(str(row.target), int(row.id))
    return Predecessor(found, deliveries) if found is not None else None


def _link(sessions: sessionmaker[Session], pending: Sequence[Delivery], predecessor: Predecessor) -> None:
    """Record on each pending delivery which SR its SR replaces and which delivery sent that one."""
    with db.transaction(sessions) as session:
        for delivery in pending:
            session.execute(
                update(Delivery)
                .where(Delivery.id == delivery.id)
                .values(
                    predecessor_sr_uid=predecessor.sr.sop_instance_uid,
                    replaces_delivery_id=predecessor.delivery_for(delivery.target),
                )
            )


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
        predecessor = (
            find_predecessor(session, run=run, result=result)
            if settings.pacs_send_sr and result is not None and run is not None
            else None
        )
    by_target = {s.target: s for s in senders}
    pending = [d for d in pending if d.target in by_target]
    if not pending or result is None or run is None:
        return _outcomes(deps.sessions, run_id)
    Path(settings.work_dir).mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"deliver-{run_id}-", dir=settings.work_dir))
    try:
        retry_later: list[str] = []
        try:
            objects = build_objects(
                result=result,
                run=run,
                settings=deps.settings,
                store=deps.results_store,
                work_dir=scratch,
                replaces=predecessor.sr if predecessor is not None else None,
            )
        except DeliveryError as exc:
            log.warning("run %s: nothing can be delivered: %s", run_id, exc.message)
            _fail_all(deps.sessions, [d.id for d in pending], exc.message)
            return _outcomes(deps.sessions, run_id)
        except TransientError as exc:  # the results store is unavailable: an attempt for each target
            error = DeliveryError(f"results store unavailable: {exc.message}", transient=True)
            retry_later = [m for d in pending if (m := _after_failure(deps, d, error, objects=[])) is not None]
        else:
            if predecessor is not None:
                _link(deps.sessions, pending, predecessor)
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


def requeue(
    sessions: sessionmaker[Session], *, states: Sequence[str] = ("failed",), run_id: int | None = None
) -> list[int]:
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


def deliver_in_process(deps: DeliveryDeps, *, run_ids: Sequence[int]) -> list[DeliveryOutcome]:
    """The embedded default's delivery: one attempt per run, right after processing.

    Deliveries that meet transient trouble stay ``pending`` (``ichvol redeliver --state
    pending`` sends them later).
    """
    outcomes: list[DeliveryOutcome] = []
    for run_id in run_ids:
        try:
            outcomes.extend(deliver_run(run_id=run_id, deps=deps))
        except TransientError as exc:
            log.warning("run %s: delivery pending (%s)", run_id, exc.message)
            outcomes.extend(_outcomes(deps.sessions, run_id))
    return outcomes


def runs_without_deliveries(
    sessions: sessionmaker[Session], *, targets: list[str], run_id: int | None = None, since: datetime | None = None
) -> list[int]:
    """Runs with a result but no delivery row for one of ``targets``."""
    with sessions() as session:
        query = select(Result.run_id, Result.created_at)
        if run_id is not None:
            query = query.where(Result.run_id == run_id)
        if since is not None:
            query = query.where(Result.created_at >= since)
        results = {int(r.run_id) for r in session.execute(query)}
        have = session.execute(select(Delivery.run_id, Delivery.target).where(Delivery.target.in_(targets))).all()
    covered: dict[int, set[str]] = {}
    for row in have:
        covered.setdefault(int(row.run_id), set()).add(str(row.target))
    return sorted(r for r in results if not set(targets) <= covered.get(r, set()))
