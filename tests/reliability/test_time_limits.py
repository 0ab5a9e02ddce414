"""A worker hitting its soft and hard time limits on slow studies, and a study that crashes
its pool process on every delivery, in a batch of good ones.

The worker loads tests/helpers/worker_hooks.py (``-I``): a study of 11 slices sleeps in the
model call until the soft limit's exception ends it; a study of 13 slices blocks the
soft-limit signal, as native code stuck in a model call would, until the hard limit kills
its pool process. The first ends ``failed`` / ``time_limit`` in the pool process; the
second is recorded ``failed`` / ``time_limit`` by the worker's parent (Celery's
``task_failure`` signal), its artefacts deleted, and it is not delivered again. The batch
goes on in a fresh pool process. A study of 9 slices kills its pool process each time:
after ``ICHVOL_MAX_ATTEMPTS`` deliveries the next one finds the run still ``running``,
claimed by a process of this host that no longer exists, and marks it ``dead``
(``worker_lost``) instead of looping for ever.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from tests.helpers.faults import generate_phantoms
from tests.helpers.worker_hooks import CRASH_SLICES, HARD_SLOW_SLICES, SOFT_SLOW_SLICES
from tests.reliability.conftest import MakeEnv
from worker.infra import db
from worker.infra.tables import Run, RunState, Study

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.e2e, pytest.mark.timeout(600)]


def test_time_limits_and_a_study_that_crashes_its_worker(
    make_env: MakeEnv, phantom_library: dict[str, Path], tmp_path: Path
) -> None:
    # The crashing study must be buried by the worker's fourth delivery, not by the scheduler's
    # recovery of lost runs: a grace period longer than a pool process takes to start on a busy
    # machine keeps the scheduler out of that race.
    env = make_env(soft_time_limit_s=8.0, hard_time_limit_s=14.0, max_attempts=3, lost_run_grace_s=120.0)
    slow = {
        "slow-soft": generate_phantoms(tmp_path / "soft", 1, first=900, n_slices=SOFT_SLOW_SLICES),
        "slow-hard": generate_phantoms(tmp_path / "hard", 1, first=901, n_slices=HARD_SLOW_SLICES),
        "crash": generate_phantoms(tmp_path / "crash", 1, first=902, n_slices=CRASH_SLICES),
    }
    studies = dict(phantom_library)
    for name, generated in slow.items():
        (folder,) = generated.values()
        studies[name] = folder
    prefixes = env.upload(studies)
    worker = env.worker(extra_args=["-I", "tests.helpers.worker_hooks"])
    env.scheduler()
    pool_before = worker.pool_pids()
    env.wait(prefixes, timeout_s=450)
    report = env.check(prefixes)
    assert report.ok, report.problems
    assert report.succeeded == len(phantom_library) and report.failed == 2 and report.dead == 1
    with db.transaction(env.sessions) as s:
        rows = {
            prefix.split("/")[1]: run
            for prefix, run in s.execute(select(Study.prefix, Run).join(Run, Run.study_id == Study.id)).all()
        }
    soft, hard, crash = rows["slow-soft"], rows["slow-hard"], rows["crash"]
    assert soft.state is RunState.FAILED and soft.error_code == "time_limit"
    assert "soft time limit" in (soft.error_message or "")
    assert hard.state is RunState.FAILED and hard.error_code == "time_limit"
    assert "hard time limit" in (hard.error_message or "")
    assert soft.attempts == 1 and hard.attempts == 1, "a timed-out study was delivered again"
    assert crash.state is RunState.DEAD and crash.error_code == "worker_lost"
    assert crash.attempts == 3 and "died on each of 3 deliveries" in (crash.error_message or "")
    # the hard limit killed the pool process; a new one finished the batch
    assert set(worker.pool_pids()).isdisjoint(pool_before)
    assert "Hard time limit" in worker.log_tail(10**7)
