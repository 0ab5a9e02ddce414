"""Scheduler faults and odd exports: killed mid-poll and restarted, two schedulers at once,
the same study exported twice, a study that changes while it is being processed.

The database is the guard: study versions and runs are registered with
``INSERT ... ON CONFLICT DO NOTHING RETURNING`` (only the inserting scheduler sends),
messages go out after the commit, runs left ``queued`` by a scheduler that died between
commit and send are sent again after ``ICHVOL_QUEUED_TIMEOUT_S``, and the worker checks
the study's fingerprint before it downloads anything.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select

from tests.helpers.faults import run_states, upload_study, wait_for
from tests.reliability.conftest import MakeEnv
from worker.infra import db
from worker.infra.tables import Result, Run, RunState, Study

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.e2e, pytest.mark.timeout(600)]


def n_runs(sessions) -> int:  # type: ignore[no-untyped-def]
    with db.transaction(sessions) as s:
        return int(s.scalar(select(func.count()).select_from(Run)) or 0)


def queue_length(broker_url: str, queue: str) -> int:
    client = redis.Redis.from_url(broker_url)
    try:
        return int(client.llen(queue))  # type: ignore[arg-type]
    finally:
        client.close()


def test_scheduler_killed_mid_poll_and_restarted(make_env: MakeEnv, phantom_library: dict[str, Path]) -> None:
    env = make_env(queued_timeout_s=10.0)
    prefixes = env.upload(phantom_library)
    scheduler = env.scheduler()
    # SIGKILL as soon as its registration commits: between commit and the last send
    wait_for(lambda: n_runs(env.sessions) > 0, timeout_s=120, interval_s=0.005, what="runs registered")
    scheduler.kill()
    sent_before_kill = queue_length(env.settings.broker_url, env.settings.queue_name)
    registered = n_runs(env.sessions)
    print(f"scheduler killed: {registered} runs registered, {sent_before_kill} sent")
    assert registered == len(prefixes), "registration is one transaction: all or nothing"
    env.worker()
    # restarted, then killed again and again at random points of its polls
    for _ in range(4):
        scheduler = env.scheduler()
        time.sleep(2.5)
        scheduler.kill()
    env.scheduler()
    env.wait(prefixes, timeout_s=400)
    report = env.check(prefixes)
    assert report.ok, report.problems
    assert report.succeeded == len(prefixes) == report.studies
    if sent_before_kill < registered:  # the kill landed between commit and send
        assert re.search(r"[1-9]\d* re-sent", env.logs()), "the unsent runs were never sent again"


def test_two_schedulers_at_once(make_env: MakeEnv, phantom_library: dict[str, Path]) -> None:
    # queued runs are never re-sent here: every message the worker receives was a first send
    env = make_env(queued_timeout_s=3600.0, poll_interval_s=0.3)
    prefixes = env.upload(phantom_library)
    worker = env.worker()
    first, second = env.scheduler(), env.scheduler()
    env.wait(prefixes, timeout_s=400)
    report = env.check(prefixes)
    assert report.ok, report.problems
    assert report.succeeded == len(prefixes) == report.studies
    with db.transaction(env.sessions) as s:
        attempts = list(s.scalars(select(Run.attempts)))
    assert attempts == [1] * len(prefixes), "a run was delivered twice"
    received = len(re.findall(r"Task ichvol\.process_run\[[^\]]+\] received", worker.log_tail(10**8)))
    assert received == len(prefixes), f"{received} messages for {len(prefixes)} runs"
    logs = {p: p.log_text() for p in (first, second)}
    enqueued = [sum(int(n) for n in re.findall(r"(\d+) enqueued", text)) for text in logs.values()]
    assert sum(enqueued) == len(prefixes), f"the two schedulers sent {enqueued} runs"


def test_the_same_study_exported_twice(make_env: MakeEnv, phantom_library: dict[str, Path]) -> None:
    env = make_env()
    prefixes = env.upload(phantom_library)
    twice = dict(list(phantom_library.items())[:10])
    # the same files a second time under another folder name (a second export)
    for name, folder in twice.items():
        prefix = f"exports/again-{name}/"
        upload_study(env.client, env.bucket, folder, prefix)
        prefixes.append(prefix)
    env.worker()
    scheduler = env.scheduler()
    env.wait(prefixes, timeout_s=400)
    # ...and the same files once more into their original folders (unchanged content)
    for name, folder in twice.items():
        upload_study(env.client, env.bucket, folder, f"exports/{name}/")
    time.sleep(4 * env.settings.poll_interval_s + 1.0)
    assert scheduler.alive
    report = env.check(prefixes)
    assert report.ok, report.problems
    assert report.studies == len(prefixes) == report.succeeded, "an unchanged re-export made a new version"
    with db.transaction(env.sessions) as s:
        rows = s.execute(
            select(Study.prefix, Study.study_instance_uid, Result.volume_ml)
            .join(Run, Run.study_id == Study.id)
            .join(Result, Result.run_id == Run.id)
        ).all()
    by_prefix = {r.prefix: r for r in rows}
    for name in twice:
        one, two = by_prefix[f"exports/{name}/"], by_prefix[f"exports/again-{name}/"]
        assert one.study_instance_uid == two.study_instance_uid
        assert one.volume_ml == two.volume_ml


def test_a_study_that_changes_while_it_is_processed(
    make_env: MakeEnv, phantom_library: dict[str, Path], tmp_path: Path
) -> None:
    env = make_env()
    prefixes = env.upload(phantom_library)
    env.worker()
    env.scheduler()
    wait_for(lambda: run_states(env.sessions)["succeeded"] >= 10, timeout_s=180, what="ten studies processed")
    # re-export the last ten studies with one file more (a late slice copy), while queued
    changed = list(phantom_library)[-10:]
    for name in changed:
        folder = tmp_path / "changed" / name
        shutil.copytree(phantom_library[name], folder)
        first = sorted(folder.glob("*.dcm"))[0]
        shutil.copy(first, folder / "late-arrival.dcm")
        upload_study(env.client, env.bucket, folder, f"exports/{name}/")
    env.wait(prefixes, timeout_s=400)
    time.sleep(3 * env.settings.poll_interval_s)
    env.wait(prefixes, timeout_s=200)
    report = env.check(prefixes)
    assert report.ok, report.problems
    with db.transaction(env.sessions) as s:
        rows = s.execute(
            select(Study.prefix, Study.id, Run.state, Run.error_code).join(Run, Run.study_id == Study.id)
        ).all()
    for name in changed:
        versions = sorted((r for r in rows if r.prefix == f"exports/{name}/"), key=lambda r: r.id)
        assert len(versions) == 2, (name, versions)
        old, new = versions
        assert new.state is RunState.SUCCEEDED
        assert old.state is RunState.SUCCEEDED or (old.state is RunState.FAILED and old.error_code == "study_changed")
    changed_failed = sum(1 for r in rows if r.error_code == "study_changed")
    assert report.studies == len(prefixes) + len(changed)
    assert report.succeeded == len(prefixes) + len(changed) - changed_failed
    print(f"{changed_failed} of {len(changed)} changed studies were caught by the fingerprint check")
