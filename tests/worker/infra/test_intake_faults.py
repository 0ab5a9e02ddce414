"""Recovery timing: a run counts as lost only past the hard time limit plus ICHVOL_LOST_RUN_GRACE_S."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from worker.core.settings import Settings
from worker.infra import db
from worker.infra.intake import recover
from worker.infra.tables import Run, RunState, Study

pytestmark = pytest.mark.integration


def test_lost_run_grace_is_a_setting(pg_migrated_url: str) -> None:
    sessions = db.session_factory(db.make_engine(pg_migrated_url))
    now = datetime.now(UTC)
    settings = Settings(hard_time_limit_s=100.0, soft_time_limit_s=50.0, lost_run_grace_s=20.0, max_attempts=3)
    with db.transaction(sessions) as s:
        study = Study(bucket="b", prefix="p/", fingerprint="f" * 64, n_objects=1, total_bytes=1, discovered_at=now)
        s.add(study)
        s.flush()
        for name, age_s in (("young", 115.0), ("old", 125.0)):
            s.add(
                Run(
                    study_id=study.id,
                    model_name="m",
                    model_version=name,
                    model_sha256="0",
                    state=RunState.RUNNING,
                    attempts=1,
                    started_at=now - timedelta(seconds=age_s),
                    celery_task_id=name,
                )
            )
    resend, dead = recover(sessions, settings=settings, now=now)
    assert [task for _, task in resend] == ["old"] and dead == 0
    with db.transaction(sessions) as s:
        s.execute(update(Run).values(state=RunState.RUNNING, attempts=3, started_at=now - timedelta(seconds=125)))
    resend, dead = recover(sessions, settings=settings, now=now)
    assert resend == [] and dead == 2
    assert Settings.from_env({"ICHVOL_LOST_RUN_GRACE_S": "5"}).lost_run_grace_s == 5.0
    sessions.kw["bind"].dispose()
