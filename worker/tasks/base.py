"""The one base of every task: transient errors retry with backoff, the soft time limit becomes ours.

A task body is a few lines: get this process's dependencies, call the plain function
below the tasks, shape the reply. What every task does the same way lives here:

* a :class:`~worker.core.errors.TransientError` out of the body is retried with
  exponential backoff, :func:`backoff_s` from the two settings the task names in
  ``backoff_settings`` (``ICHVOL_RETRY_BACKOFF_S`` / ``_MAX_S`` by default), without a
  cap on the number of retries (the plain functions and the task decide when to give
  up, from the attempts recorded in the database);
* the soft time limit: in a prefork pool process Celery raises its own
  ``SoftTimeLimitExceeded`` from a signal handler wherever the code happens to be. The
  base installs a handler that raises :class:`~worker.core.errors.SoftTimeLimitReached`
  instead, so the plain functions record the limit without knowing Celery.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any, ClassVar

from celery import Task

from worker.core.errors import SoftTimeLimitReached, TransientError

log = logging.getLogger(__name__)


def backoff_s(retries: int, *, base_s: float, max_s: float) -> float:
    """Delay before retry number ``retries + 1``: ``base * 2**retries``, capped at ``max_s`` (seconds)."""
    return float(min(max_s, base_s * (2 ** max(0, retries))))


def _raise_soft_time_limit(signum: int, frame: FrameType | None) -> None:
    raise SoftTimeLimitReached("the soft time limit was reached")


def soft_time_limit_raises_our_error() -> bool:
    """In a prefork pool process, make the soft time limit raise :class:`SoftTimeLimitReached`.

    Replaces billiard's soft-timeout signal handler (installed in each pool process when
    it starts) by one that raises the project's error. Elsewhere (the worker's parent, an
    eager call in a test, a thread) nothing changes. Returns whether the handler is ours.
    """
    from billiard import pool

    signum = pool.SIG_SOFT_TIMEOUT
    if signum is None or threading.current_thread() is not threading.main_thread():
        return False
    current = signal.getsignal(signum)
    if current is pool.soft_timeout_sighandler:
        signal.signal(signum, _raise_soft_time_limit)
        return True
    return current is _raise_soft_time_limit


class IchvolTask(Task):  # type: ignore[misc]
    """Base of every ichvol task (``@app.task(base=IchvolTask, ...)``)."""

    #: The settings of this task's backoff: first delay and cap, in seconds.
    backoff_settings: ClassVar[tuple[str, str]] = ("retry_backoff_s", "retry_backoff_max_s")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        soft_time_limit_raises_our_error()
        try:
            return super().__call__(*args, **kwargs)
        except TransientError as exc:
            settings = self.app.conf.ichvol_settings
            first, cap = (float(getattr(settings, name)) for name in self.backoff_settings)
            delay = backoff_s(self.request.retries, base_s=first, max_s=cap)
            log.info("%s %s retried in %.0f s: %s", self.name, list(args), delay, exc.message)
            raise self.retry(exc=exc, countdown=delay) from None
