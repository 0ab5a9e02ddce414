"""Celery task ``ichvol.process_run``: a thin wrapper around :func:`worker.overnight.processing.process_run`.

Transient errors retry with exponential backoff (``ICHVOL_RETRY_BACKOFF_S`` doubling up
to ``ICHVOL_RETRY_BACKOFF_MAX_S``, :class:`worker.tasks.base.IchvolTask`) until the run
used ``ICHVOL_MAX_ATTEMPTS`` deliveries; then it is failed with ``retries_exhausted``.
Permanent errors are already recorded by ``process_run`` and never retried.
"""

from __future__ import annotations

from typing import Any

from worker.celery import app
from worker.core.errors import ErrorCode, TransientError
from worker.tasks.base import IchvolTask
from worker.tasks.names import TASK_PROCESS_RUN


@app.task(  # type: ignore[untyped-decorator]
    name=TASK_PROCESS_RUN, base=IchvolTask, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None
)
def process_run_task(self: IchvolTask, run_id: int) -> dict[str, Any]:
    from worker.overnight import runtime
    from worker.overnight.processing import fail_run, process_run

    deps = runtime.get_deps(app.conf.ichvol_settings)
    settings = deps.settings
    try:
        outcome = process_run(run_id=int(run_id), deps=deps, task_id=self.request.id)
    except TransientError as exc:
        if self.request.retries + 1 < settings.max_attempts:
            raise  # the base retries with backoff
        fail_run(
            deps,
            run_id=int(run_id),
            code=ErrorCode.RETRIES_EXHAUSTED,
            message=f"gave up after {settings.max_attempts} attempts: {exc.message}",
        )
        runtime.record_processed(succeeded=False)
        return {"run_id": run_id, "state": "failed", "error_code": ErrorCode.RETRIES_EXHAUSTED.value}
    if not outcome.skipped:
        runtime.record_processed(succeeded=outcome.state == "succeeded")
    if settings.pacs_targets and (outcome.state == "succeeded" or outcome.skipped):
        from worker.tasks.deliver import enqueue_delivery  # after the commit; sends pending deliveries only

        enqueue_delivery(run_id=int(run_id), deps=deps)
    return {
        "run_id": outcome.run_id,
        "state": outcome.state,
        "volume_ml": outcome.volume_ml,
        "error_code": outcome.error_code,
    }
