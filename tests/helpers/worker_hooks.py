"""Test-only hooks loaded into a real worker: ``celery -A worker worker -I tests.helpers.worker_hooks``.

Nothing in the project imports this module; only the time-limit scenario of the
reliability suite starts a worker with it. It wraps each pool process's segmenter (after
the model is loaded, on ``worker_process_init``) so that two kinds of study are slow:

* a study of :data:`SOFT_SLOW_SLICES` slices sleeps in the model call, interruptibly: the
  soft time limit's exception ends it, as it would a slow Python loop;
* a study of :data:`HARD_SLOW_SLICES` slices blocks the soft-limit signal (SIGUSR1) and
  sleeps, as a model call stuck in native code that never returns to Python: only the
  hard time limit (the pool process is killed) ends it;
* a study of :data:`CRASH_SLICES` slices kills its pool process (SIGKILL), as a crash in
  native code or the out-of-memory killer would, on every delivery.

Every other study goes straight to the real model.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from celery import signals

SOFT_SLOW_SLICES = 11
HARD_SLOW_SLICES = 13
CRASH_SLICES = 9
SLEEP_S = 3600.0


class SlowStudySegmenter:
    """A segmenter that stalls on the slow studies and delegates everything else."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    @property
    def info(self) -> Any:
        return self.inner.info

    def predict(self, images: Any) -> Any:
        n = int(images.shape[0])
        if n == SOFT_SLOW_SLICES:
            time.sleep(SLEEP_S)
        elif n == CRASH_SLICES:
            os.kill(os.getpid(), signal.SIGKILL)
        elif n == HARD_SLOW_SLICES:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
            try:
                time.sleep(SLEEP_S)
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
        return self.inner.predict(images)


@signals.worker_process_init.connect  # type: ignore[untyped-decorator]
def _wrap_segmenter(**_: Any) -> None:
    # Connected after worker.celery's own receiver, so the model is loaded by now.
    from worker.overnight import runtime

    deps = runtime.get_deps()
    deps._segmenter = SlowStudySegmenter(deps.segmenter)
