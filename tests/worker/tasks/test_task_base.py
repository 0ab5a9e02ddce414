"""The one task base: transient errors retried with backoff, the soft time limit turned into ours."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator

import pytest
from billiard import pool

from worker.celery import create_app
from worker.core.errors import SoftTimeLimitReached, TransientError
from worker.core.settings import Settings
from worker.tasks.base import IchvolTask, backoff_s, soft_time_limit_raises_our_error


def test_backoff_doubles_from_the_first_delay_up_to_the_cap() -> None:
    assert [backoff_s(n, base_s=2.0, max_s=30.0) for n in range(6)] == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert backoff_s(-1, base_s=2.0, max_s=30.0) == 2.0


def test_a_transient_error_is_retried_with_the_tasks_own_backoff(caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(task_always_eager=True, pacs_retry_backoff_s=3.0, pacs_retry_backoff_max_s=5.0)
    app = create_app(settings)
    seen: list[int] = []

    @app.task(  # type: ignore[untyped-decorator]
        name="ichvol.test_flaky",
        base=IchvolTask,
        backoff_settings=("pacs_retry_backoff_s", "pacs_retry_backoff_max_s"),
        bind=True,
        max_retries=None,
    )
    def flaky(self: IchvolTask, run_id: int) -> int:
        seen.append(int(self.request.retries))
        if self.request.retries < 3:
            raise TransientError("PACS unreachable")
        return run_id

    with caplog.at_level(logging.INFO, logger="worker.tasks.base"):
        assert flaky.apply(args=[7]).get() == 7
    assert seen == [0, 1, 2, 3]
    delays = [r.getMessage() for r in caplog.records if "retried in" in r.getMessage()]
    assert [d.split("retried in ")[1].split(" s")[0] for d in delays] == ["3", "5", "5"]
    assert all("PACS unreachable" in d for d in delays)


@pytest.fixture()
def usr1_handler() -> Iterator[None]:
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        yield
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_in_a_pool_process_the_soft_time_limit_raises_the_projects_error(usr1_handler: None) -> None:
    signal.signal(signal.SIGUSR1, pool.soft_timeout_sighandler)  # as billiard sets up a pool process
    assert soft_time_limit_raises_our_error()
    with pytest.raises(SoftTimeLimitReached):
        os.kill(os.getpid(), signal.SIGUSR1)
        signal.sigtimedwait([], 0)  # let the handler run
    assert soft_time_limit_raises_our_error(), "a second task in the same process keeps the handler"


def test_outside_a_pool_process_nothing_changes(usr1_handler: None) -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    assert not soft_time_limit_raises_our_error()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
