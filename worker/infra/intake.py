"""One poll of the export bucket: register complete studies, create runs, enqueue after commit.

Idempotency: studies are registered once per ``(bucket, prefix, fingerprint)`` and runs
once per ``(study, model version)`` with ``INSERT ... ON CONFLICT DO NOTHING RETURNING``;
only rows this scheduler actually inserted come back, so two schedulers polling at
once never enqueue the same run twice. Messages are sent only after the commit.

Nothing stays stuck:

* a run still ``queued`` after ``ICHVOL_QUEUED_TIMEOUT_S`` (a lost message, a send that
  failed, a scheduler killed between commit and send) is sent again;
* a run ``running`` for longer than the hard time limit plus ``ICHVOL_LOST_RUN_GRACE_S``
  lost its worker: it is queued again, or marked ``dead`` once it used ``ICHVOL_MAX_ATTEMPTS``.

Cost: one streamed listing, then a few set-based statements per poll, never one
database round trip per object or per study.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from sqlalchemy import and_, or_, update
from sqlalchemy.orm import Session, sessionmaker

from worker.core.errors import ErrorCode, TransientError
from worker.core.settings import Settings
from worker.infra import db
from worker.infra.listing import StudyListing, group_studies, normalise_prefix
from worker.infra.object_store import ObjectInfo, ObjectStore
from worker.infra.tables import Run, RunState, Study
from worker.model.weights import ModelInfo

log = logging.getLogger(__name__)

#: Sends one run to the workers: ``(run_id, task_id)``. Raises on broker trouble.
Enqueue = Callable[[int, str], None]

CHUNK = 1000
T = TypeVar("T")


@dataclass(frozen=True)
class PollReport:
    """Counts of one poll (printed by ``--once`` and logged by the loop)."""

    objects: int
    studies: int
    incomplete: int
    registered: int
    enqueued: int
    resent: int
    dead: int
    send_failures: int
    seconds: float

    def line(self) -> str:
        return (
            f"poll: {self.objects} objects, {self.studies} studies ({self.incomplete} incomplete), "
            f"{self.registered} new study versions, {self.enqueued} enqueued, {self.resent} re-sent, "
            f"{self.dead} dead, {self.send_failures} send failures, {self.seconds:.2f} s"
        )


class _CountingIterator:
    def __init__(self, items: Iterable[ObjectInfo]) -> None:
        self._items = iter(items)
        self.count = 0

    def __iter__(self) -> _CountingIterator:
        return self

    def __next__(self) -> ObjectInfo:
        item = next(self._items)
        self.count += 1
        return item


def _chunks(items: Sequence[T], size: int = CHUNK) -> list[Sequence[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def register(
    sessions: sessionmaker[Session], *, bucket: str, studies: Sequence[StudyListing], model: ModelInfo, now: datetime
) -> list[tuple[int, str]]:
    """Insert new study versions and their runs in one transaction; return ``(run_id, task_id)``."""
    new_runs: list[tuple[int, str]] = []
    with db.transaction(sessions) as session:
        study_ids: list[int] = []
        for chunk in _chunks(studies):
            rows = [
                {
                    "bucket": bucket,
                    "prefix": s.prefix,
                    "fingerprint": s.fingerprint,
                    "n_objects": s.n_objects,
                    "total_bytes": s.total_bytes,
                    "discovered_at": now,
                }
                for s in chunk
            ]
            inserted = db.insert_ignore(
                session, Study, rows, conflict_columns=["bucket", "prefix", "fingerprint"], returning=["id"]
            )
            study_ids.extend(int(r.id) for r in inserted)
        for id_chunk in _chunks(study_ids):
            rows = [
                {
                    "study_id": sid,
                    "model_name": model.name,
                    "model_version": model.version,
                    "model_sha256": model.sha256,
                    "state": RunState.QUEUED,
                    "attempts": 0,
                    "celery_task_id": str(uuid.uuid4()),
                    "enqueued_at": now,
                }
                for sid in id_chunk
            ]
            inserted = db.insert_ignore(
                session,
                Run,
                rows,
                conflict_columns=["study_id", "model_version"],
                returning=["id", "celery_task_id"],
            )
            new_runs.extend((int(r.id), str(r.celery_task_id)) for r in inserted)
    return new_runs


def recover(sessions: sessionmaker[Session], *, settings: Settings, now: datetime) -> tuple[list[tuple[int, str]], int]:
    """Re-send runs stuck in ``queued``; requeue or bury runs whose worker vanished.

    Returns the runs to send again and how many were marked dead. Each run is taken by a
    conditional update, so two schedulers never both re-send it.
    """
    queued_before = now - timedelta(seconds=settings.queued_timeout_s)
    running_before = now - timedelta(seconds=settings.hard_time_limit_s + settings.lost_run_grace_s)
    with db.transaction(sessions) as session:
        dead = db.rowcount(
            session.execute(
                update(Run)
                .where(
                    Run.state == RunState.RUNNING,
                    Run.started_at < running_before,
                    Run.attempts >= settings.max_attempts,
                )
                .values(
                    state=RunState.DEAD,
                    finished_at=now,
                    error_code=ErrorCode.WORKER_LOST.value,
                    error_message=(
                        f"the worker vanished or exceeded the hard time limit ({settings.hard_time_limit_s:.0f} s) "
                        f"on each of {settings.max_attempts} deliveries"
                    ),
                )
            )
        )
        resend = session.execute(
            update(Run)
            .where(
                or_(
                    and_(Run.state == RunState.QUEUED, Run.enqueued_at < queued_before),
                    and_(Run.state == RunState.RUNNING, Run.started_at < running_before),
                )
            )
            .values(state=RunState.QUEUED, enqueued_at=now, claim_token=None)
            .returning(Run.id, Run.celery_task_id)
        ).all()
    return [(int(r.id), str(r.celery_task_id or uuid.uuid4())) for r in resend], dead


def _mark_unsent(sessions: sessionmaker[Session], *, run_ids: Sequence[int], settings: Settings, now: datetime) -> None:
    """Runs whose message could not be sent: make the next poll re-send them."""
    if not run_ids:
        return
    overdue = now - timedelta(seconds=settings.queued_timeout_s + 1)
    with db.transaction(sessions) as session:
        session.execute(
            update(Run).where(Run.id.in_(run_ids), Run.state == RunState.QUEUED).values(enqueued_at=overdue)
        )


def poll_once(
    *,
    store: ObjectStore,
    sessions: sessionmaker[Session],
    settings: Settings,
    model: ModelInfo,
    enqueue: Enqueue,
    bucket: str | None = None,
    now: datetime | None = None,
) -> PollReport:
    """List the export prefix, register complete studies, enqueue new runs, recover stuck ones."""
    started = time.perf_counter()
    now = now or datetime.now(UTC)
    bucket = bucket or settings.export_bucket
    listing_iter = _CountingIterator(store.iter_objects(normalise_prefix(settings.export_prefix)))
    listing = group_studies(listing_iter, export_prefix=settings.export_prefix, marker_name=settings.marker_name)
    complete = [s for s in listing.values() if s.is_complete(now=now, quiet_period_s=settings.quiet_period_s)]
    new_runs = register(sessions, bucket=bucket, studies=complete, model=model, now=now)
    resend, dead = recover(sessions, settings=settings, now=now)
    failed: list[int] = []
    for run_id, task_id in [*new_runs, *resend]:
        try:
            enqueue(run_id, task_id)
        except TransientError as exc:
            log.warning("could not send run %s: %s", run_id, exc.message)
            failed.append(run_id)
    _mark_unsent(sessions, run_ids=failed, settings=settings, now=now)
    report = PollReport(
        objects=listing_iter.count,
        studies=len(listing),
        incomplete=len(listing) - len(complete),
        registered=len(new_runs),
        enqueued=len(new_runs) - len([r for r in failed if r in {n for n, _ in new_runs}]),
        resent=len(resend),
        dead=dead,
        send_failures=len(failed),
        seconds=round(time.perf_counter() - started, 3),
    )
    log.info(report.line())
    return report
