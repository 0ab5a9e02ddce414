"""Sending tasks by name from outside a worker: ``ichvol redeliver --enqueue``.

A small Celery app of its own, configured from the settings given (not the worker's app,
which reads the environment when imported), publishes to the worker queue.
"""

from __future__ import annotations

from collections.abc import Sequence

from celery import Celery

from worker.core.errors import TransientError
from worker.core.settings import Settings
from worker.tasks.names import TASK_DELIVER


def send_deliveries(run_ids: Sequence[int], settings: Settings) -> None:
    """Publish one ``ichvol.deliver`` per run. Raises :class:`TransientError` when the broker is down."""
    app = Celery("ichvol-redeliver", broker=settings.broker_url)
    app.conf.update(broker_connection_retry_on_startup=True, task_serializer="json")
    try:
        for run_id in run_ids:
            app.send_task(TASK_DELIVER, args=[run_id], queue=settings.queue_name)
    except Exception as exc:  # kombu's OperationalError and socket errors: the broker is down
        raise TransientError(type(exc).__name__) from exc
