"""Sending runs to the workers by task name (the scheduler never imports the task code)."""

from __future__ import annotations

from collections.abc import Callable

from celery import Celery
from kombu.exceptions import OperationalError

from worker.core.errors import TransientError
from worker.core.settings import Settings

TASK_PROCESS_RUN = "ichvol.process_run"


def celery_sender(settings: Settings) -> Callable[[int, str], None]:
    """An ``enqueue(run_id, task_id)`` that publishes ``ichvol.process_run`` to the broker."""
    app = Celery("ichvol-scheduler", broker=settings.broker_url)
    app.conf.update(
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        task_serializer="json",
    )

    def enqueue(run_id: int, task_id: str) -> None:
        try:
            app.send_task(
                TASK_PROCESS_RUN,
                args=[run_id],
                task_id=task_id,
                queue=settings.queue_name,
                retry=True,
                retry_policy={
                    "max_retries": 3,
                    "interval_start": 0.2,
                    "interval_step": 0.5,
                    "interval_max": 2,
                },
            )
        except (OperationalError, ConnectionError, OSError) as exc:
            raise TransientError(f"broker unavailable: {exc}") from exc

    return enqueue
