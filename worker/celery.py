"""The Celery application (``celery -A worker worker`` finds ``app`` here): the app and its signals.

With :mod:`worker.tasks` it is the Celery adapter, the only code that imports Celery.

Delivery guarantees for long GPU tasks:

* ``task_acks_late`` + ``task_reject_on_worker_lost``: a study whose worker process
  dies is delivered again, never silently dropped;
* ``worker_prefetch_multiplier = 1``: a worker holds one study at a time;
* a pool process that dies is replaced, and the replacement may take minutes to load
  the model before it counts as started (:data:`POOL_PROCESS_START_TIMEOUT_S`);
* soft/hard time limits from the settings; the Redis ``visibility_timeout`` is set
  above the hard limit, otherwise a long study would be delivered twice;
* no result backend: the database is the record of every run;
* a study that outlasts the hard time limit has its pool process killed; the parent
  records the run as failed (``time_limit``) on Celery's ``task_failure`` signal, so the
  run neither stays ``running`` nor is delivered again.

The model is loaded in each pool process after the fork (``worker_process_init``),
never in the parent: TensorFlow is not fork-safe.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, signals

from worker.core.settings import Settings
from worker.tasks.names import TASK_DELIVER, TASK_PROCESS_RUN

__all__ = ["TASK_DELIVER", "TASK_PROCESS_RUN", "app", "create_app"]

#: How long a new pool process may take to start (it loads the model before it reports
#: "up"). Celery's default, 4 s, is shorter than loading TensorFlow and the weights: a pool
#: process that died (killed, out of memory) was then replaced by one killed for being
#: slow, again and again, and the worker never processed another study.
POOL_PROCESS_START_TIMEOUT_S = 300.0


def create_app(settings: Settings | None = None) -> Celery:
    settings = settings or Settings.from_env()
    app = Celery("ichvol", broker=settings.broker_url, include=["worker.tasks.process", "worker.tasks.deliver"])
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_proc_alive_timeout=POOL_PROCESS_START_TIMEOUT_S,
        task_soft_time_limit=settings.soft_time_limit_s,
        task_time_limit=settings.hard_time_limit_s,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        task_default_queue=settings.queue_name,
        task_routes={TASK_PROCESS_RUN: {"queue": settings.queue_name}},
        task_ignore_result=True,
        task_always_eager=settings.task_always_eager,
        task_serializer="json",
        accept_content=["json"],
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        timezone="UTC",
    )
    app.conf.ichvol_settings = settings
    return app


app = create_app()

# Remote-control commands (`celery -A worker inspect model_info`) register on import.
from worker.tasks import control as _control  # noqa: E402,F401


@signals.worker_process_init.connect  # type: ignore[untyped-decorator]
def _load_model_in_child(**_: Any) -> None:
    from worker.overnight import runtime

    runtime.init_pool_process(app.conf.ichvol_settings)


@signals.worker_process_shutdown.connect  # type: ignore[untyped-decorator]
def _close_child(**_: Any) -> None:
    from worker.overnight import runtime

    runtime.shutdown_pool_process()


@signals.worker_init.connect  # type: ignore[untyped-decorator]
def _init_parent(**_: Any) -> None:
    from worker.overnight import runtime

    runtime.init_parent(app.conf.ichvol_settings)


@signals.task_failure.connect  # type: ignore[untyped-decorator]
def _record_hard_time_limit(
    sender: Any = None, task_id: str | None = None, exception: BaseException | None = None, args: Any = None, **_: Any
) -> None:
    # Celery sends task_failure from the parent when the hard limit killed the pool process.
    from billiard.exceptions import TimeLimitExceeded

    if not isinstance(exception, TimeLimitExceeded) or getattr(sender, "name", None) != TASK_PROCESS_RUN:
        return
    from worker.overnight import runtime

    runtime.record_hard_time_limit(app.conf.ichvol_settings, run_id=int(args[0]), task_id=task_id)
