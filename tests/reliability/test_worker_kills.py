"""SIGKILL of the worker's pool process mid-study, and of the whole worker, then restart.

A real ``celery -A worker worker`` on a batch of phantom studies. ``acks_late`` and
``reject_on_worker_lost`` redeliver a study whose pool process died; when the whole worker
dies, its message waits out Redis's visibility timeout and the scheduler's recovery
(a run ``running`` past the hard limit + ``ICHVOL_LOST_RUN_GRACE_S``) queues it again.
Either way the claim lets the new delivery take over and the study ends with exactly
one succeeded result.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select

from tests.helpers.faults import BatchEnv, run_states, wait_for
from tests.reliability.conftest import MakeEnv
from worker.infra import db
from worker.infra.tables import Run, RunState

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.e2e, pytest.mark.timeout(480)]


def running_run(sessions) -> int | None:  # type: ignore[no-untyped-def]
    with db.transaction(sessions) as s:
        return s.scalar(select(Run.id).where(Run.state == RunState.RUNNING).limit(1))


def state_of(sessions, run_id: int) -> RunState:  # type: ignore[no-untyped-def]
    with db.transaction(sessions) as s:
        run = s.get(Run, run_id)
        assert run is not None
        return run.state


def succeeded(sessions) -> int:  # type: ignore[no-untyped-def]
    return run_states(sessions)["succeeded"]


def kill_mid_study(env: BatchEnv, kill: Callable[[], None]) -> int | None:
    """Wait for a study to be running, ``kill()``; the run id if the kill landed mid-study."""
    wait_for(lambda: running_run(env.sessions) is not None, timeout_s=120, interval_s=0.02, what="a running study")
    run_id = running_run(env.sessions)
    if run_id is None:
        return None
    kill()
    time.sleep(0.2)
    return run_id if state_of(env.sessions, run_id) is RunState.RUNNING else None


def attempts_of(env: BatchEnv) -> dict[int, int]:
    with db.transaction(env.sessions) as s:
        return {int(r.id): int(r.attempts) for r in s.execute(select(Run.id, Run.attempts))}


def test_pool_process_killed_mid_study_is_redelivered(make_env: MakeEnv, phantom_library: dict[str, Path]) -> None:
    env = make_env()
    prefixes = env.upload(phantom_library)
    worker = env.worker()
    env.scheduler()
    pool_before = worker.pool_pids()
    killed: list[int] = []
    for _ in range(6):
        done = succeeded(env.sessions)

        def kill() -> None:
            for pid in worker.pool_pids():
                os.kill(pid, signal.SIGKILL)

        run_id = kill_mid_study(env, kill)
        if run_id is not None:
            killed.append(run_id)
        # the parent replaces the pool process (which loads the model again) and goes on
        wait_for(lambda: succeeded(env.sessions) > done + 2, timeout_s=180, what="processing after the kill")  # noqa: B023
        if len(killed) == 2:
            break
    assert len(killed) == 2, "could not kill the pool process in the middle of a study"
    env.wait(prefixes, timeout_s=300)
    report = env.check(prefixes)
    assert report.ok, report.problems
    assert report.succeeded == len(prefixes) == report.studies
    attempts = attempts_of(env)
    assert all(attempts[r] >= 2 for r in killed), {r: attempts[r] for r in killed}
    assert set(worker.pool_pids()).isdisjoint(pool_before)  # really a new pool process
    assert worker.process is not None and worker.process.poll() is None  # the parent never fell over


def test_whole_worker_killed_and_restarted(make_env: MakeEnv, phantom_library: dict[str, Path]) -> None:
    env = make_env()
    prefixes = env.upload(phantom_library)
    worker = env.worker()
    env.scheduler()
    wait_for(lambda: succeeded(env.sessions) >= 5, timeout_s=180, what="five studies processed")
    run_id = None
    for _ in range(5):
        run_id = kill_mid_study(env, worker.kill)
        if run_id is not None:
            break
        worker = env.worker()
    assert run_id is not None, "could not kill the worker in the middle of a study"
    killed_at = time.monotonic()
    env.worker()  # a fresh worker; the killed delivery's message sits unacknowledged in Redis
    env.wait(prefixes, timeout_s=300)
    report = env.check(prefixes)
    assert report.ok, report.problems
    assert report.succeeded == len(prefixes) == report.studies
    assert attempts_of(env)[run_id] >= 2
    # recovered by the scheduler (hard limit + grace), long before Redis's visibility timeout
    assert time.monotonic() - killed_at < env.settings.visibility_timeout_s
