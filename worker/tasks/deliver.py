"""Celery task ``ichvol.deliver``: a thin wrapper around :func:`worker.delivery.deliveries.deliver_run`.

Sent by :func:`enqueue_delivery` only after the result's transaction committed (from
``ichvol.process_run`` once it succeeded). Transient PACS trouble retries with
exponential backoff (``ICHVOL_PACS_RETRY_BACKOFF_S`` doubling up to
``ICHVOL_PACS_RETRY_BACKOFF_MAX_S``); :func:`deliver_run` itself marks a delivery
``failed`` after ``ICHVOL_PACS_MAX_ATTEMPTS`` attempts, so the retries stop there too.
"""

from __future__ import annotations

import logging
from typing import Any

from worker.celery import app
from worker.core.errors import TransientError
from worker.delivery.deliveries import TASK_DELIVER
from worker.overnight.deps import WorkerDeps

log = logging.getLogger(__name__)


def _backoff_s(retries: int, *, base_s: float, max_s: float) -> float:
    return float(min(max_s, base_s * (2 ** max(0, retries))))


@app.task(name=TASK_DELIVER, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)  # type: ignore[untyped-decorator]
def deliver_task(self: Any, run_id: int) -> dict[str, Any]:
    from worker.core.logs import log_context
    from worker.delivery.deliveries import DeliveryDeps, deliver_run
    from worker.overnight import runtime

    worker_deps = runtime.get_deps(app.conf.ichvol_settings)
    settings = worker_deps.settings
    deps = DeliveryDeps(settings=settings, sessions=worker_deps.sessions, results_store=worker_deps.results_store)
    with log_context(run_id=run_id, task_id=self.request.id):
        try:
            outcomes = deliver_run(run_id=int(run_id), deps=deps)
        except TransientError as exc:
            delay = _backoff_s(
                self.request.retries, base_s=settings.pacs_retry_backoff_s, max_s=settings.pacs_retry_backoff_max_s
            )
            log.info("delivery of run %s retried in %.0f s: %s", run_id, delay, exc.message)
            raise self.retry(exc=exc, countdown=delay) from None
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
