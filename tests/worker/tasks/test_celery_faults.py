"""The Celery app's fault settings: slow-starting pool processes, hard time limits recorded by the parent."""

from __future__ import annotations

from typing import Any

import pytest
from billiard.exceptions import TimeLimitExceeded, WorkerLostError

from worker import celery as celery_module
from worker.overnight import runtime


def test_pool_processes_may_take_minutes_to_load_the_model() -> None:
    assert celery_module.app.conf.worker_proc_alive_timeout >= 120  # Celery's default is 4 s


class _Task:
    name = celery_module.TASK_PROCESS_RUN


@pytest.mark.parametrize(
    ("sender", "exception", "recorded"),
    [
        (_Task(), TimeLimitExceeded(720), True),
        (_Task(), WorkerLostError("killed"), False),
        (_Task(), ValueError("x"), False),
        (type("Other", (), {"name": "ichvol.deliver"})(), TimeLimitExceeded(720), False),
    ],
)
def test_only_a_hard_time_limit_of_a_run_is_recorded(
    monkeypatch: pytest.MonkeyPatch, sender: Any, exception: BaseException, recorded: bool
) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(runtime, "record_hard_time_limit", lambda settings, **kw: calls.append(kw))
    celery_module._record_hard_time_limit(sender=sender, task_id="t-1", exception=exception, args=[42])
    assert calls == ([{"run_id": 42, "task_id": "t-1"}] if recorded else [])
