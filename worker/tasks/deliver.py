"""Celery task ``ichvol.deliver``: a thin wrapper around :func:`worker.delivery.deliveries.deliver_run`.

Sent by :func:`enqueue_delivery` only after the result's transaction committed (from
``ichvol.process_run`` once it succeeded). Transient PACS trouble retries with
exponential backoff (``ICHVOL_PACS_RETRY_BACKOFF_S`` doubling up to
``ICHVOL_PACS_RETRY_BACKOFF_MAX_S``, :class:`worker.tasks.base.IchvolTask`); :func:`deliver_run` itself marks a delivery
``failed`` after ``ICHVOL_PACS_MAX_ATTEMPTS`` attempts, so the retries stop there too.
"""

from __future__ import annotations

import logging
from typing import Any

from worker.celery import app
from worker.overnight.deps import WorkerDeps
from worker.tasks.base import IchvolTask
from worker.tasks.names import TASK_DELIVER

log = logging.getLogger(__name__)


@app.task(  # type: ignore[untyped-decorator]
    name=TASK_DELIVER,
    base=IchvolTask,
    backoff_settings=("pacs_retry_backoff_s", "pacs_retry_backoff_max_s"),
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=None,
)
def deliver_task(self: IchvolTask, run_id: int) -> dict[str, Any]:
    from worker.core.logs import log_context
    from worker.delivery.deliveries import deliver_run
    from worker.overnight import runtime

    deps = runtime.get_deps(app.conf.ichvol_settings).delivery()
    with log_context(run_id=run_id, task_id=self.request.id):
        outcomes = deliver_run(run_id=int(run_id), deps=deps)  # TransientError: the base retries with backoff
    return {"run_id": run_id, "deliveries": {o.target: o.state for o in outcomes}}


def enqueue_delivery(*, run_id: int, deps: WorkerDeps) -> bool:
    """Create the run's delivery rows and send ``ichvol.deliver`` if one is pending; never raises.

    Called after the result committed, also for a redelivered, already finished run (a
    worker lost between the commit and this call would otherwise lose the trigger). If
    the rows or the message cannot be written (database or broker down), the result is
    still safe: ``ichvol redeliver --state pending`` (rows exist) or ``--missing`` (no
    rows) sends it later. Returns whether the message was sent.
    """
    from worker.delivery.deliveries import create_deliveries, senders_from_settings

    settings = deps.settings
    senders = senders_from_settings(settings)
    if not senders:
        return False
    try:
        if not create_deliveries(deps.sessions, run_id=run_id, senders=senders):
            return False  # no result, or already delivered
        deliver_task.apply_async(args=[run_id], queue=settings.queue_name)
    except Exception as exc:  # the result is committed; a lost trigger is recovered by `ichvol redeliver`
        log.warning("run %s: delivery not enqueued (%s: %s)", run_id, type(exc).__name__, exc)
        return False
    return True
