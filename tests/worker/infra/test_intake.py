"""The scheduler's poll against real PostgreSQL and a real S3 server on loopback."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, update

from tests.helpers.services import S3Bucket
from worker.core.errors import TransientError
from worker.core.settings import Settings
from worker.infra import db
from worker.infra.intake import poll_once
from worker.infra.tables import Run, RunState, Study
from worker.model.weights import ModelInfo

pytestmark = pytest.mark.integration

MODEL = ModelInfo(
    name="DR-UNet", architecture="drunet", dims=4, input_size=32, hu_window=(-20, 100), version="v1", sha256="ab" * 32
)


class Sent:
    """Collects what the scheduler sends; optionally fails."""

    def __init__(self, fail: bool = False) -> None:
        self.messages: list[tuple[int, str]] = []
        self.fail = fail
        self._lock = threading.Lock()

    def __call__(self, run_id: int, task_id: str) -> None:
        if self.fail:
            raise TransientError("broker down")
        with self._lock:
            self.messages.append((run_id, task_id))


def put(bucket: S3Bucket, key: str, data: bytes = b"x") -> None:
    bucket.client.put_object(Bucket=bucket.name, Key=key, Body=data)


def make(bucket: S3Bucket, url: str, **overrides: Any) -> tuple[Settings, Any]:
    settings = bucket.settings.replace(database_url=url, export_prefix="exports", **overrides)
    return settings, db.session_factory(db.make_engine(url))


def poll(bucket: S3Bucket, settings: Settings, sessions: Any, sent: Sent, **kw: Any) -> Any:
    return poll_once(store=bucket.store, sessions=sessions, settings=settings, model=MODEL, enqueue=sent, **kw)


def test_complete_studies_are_registered_and_enqueued_once(s3_bucket: S3Bucket, pg_migrated_url: str) -> None:
    settings, sessions = make(s3_bucket, pg_migrated_url)
    put(s3_bucket, "exports/A/1.dcm")
    put(s3_bucket, "exports/A/_COMPLETE")
    put(s3_bucket, "exports/B/1.dcm")  # no marker, just written: not quiet yet
    sent = Sent()
    report = poll(s3_bucket, settings, sessions, sent)
    assert (report.studies, report.incomplete, report.registered, report.enqueued) == (2, 1, 1, 1)
    with sessions() as s:
        study = s.scalars(select(Study)).one()
        run = s.scalars(select(Run)).one()
    assert study.prefix == "exports/A/" and study.bucket == s3_bucket.name and study.n_objects == 1
    assert sent.messages == [(run.id, run.celery_task_id)]
    assert run.state is RunState.QUEUED and run.model_version == "v1"
    # polling again changes nothing
    again = Sent()
    assert poll(s3_bucket, settings, sessions, again).registered == 0
    assert again.messages == []


def test_quiet_period_completes_a_study_without_marker(s3_bucket: S3Bucket, pg_migrated_url: str) -> None:
    settings, sessions = make(s3_bucket, pg_migrated_url)
    put(s3_bucket, "exports/B/1.dcm")
    sent = Sent()
    assert poll(s3_bucket, settings, sessions, sent).registered == 0
    later = datetime.now(UTC) + timedelta(seconds=settings.quiet_period_s + 1)
    assert poll(s3_bucket, settings, sessions, sent, now=later).registered == 1


def test_a_reexport_with_changes_is_a_new_version(s3_bucket: S3Bucket, pg_migrated_url: str) -> None:
    settings, sessions = make(s3_bucket, pg_migrated_url, quiet_period_s=0.0)
    put(s3_bucket, "exports/A/1.dcm", b"first")
    sent = Sent()
    poll(s3_bucket, settings, sessions, sent)
    put(s3_bucket, "exports/A/1.dcm", b"second")  # same key, new content
    poll(s3_bucket, settings, sessions, sent)
    poll(s3_bucket, settings, sessions, sent)  # unchanged now: nothing new
    with sessions() as s:
        fingerprints = s.scalars(select(Study.fingerprint).where(Study.prefix == "exports/A/")).all()
    assert len(set(fingerprints)) == 2
    assert len(sent.messages) == 2


def test_two_schedulers_at_once_never_double_enqueue(s3_bucket: S3Bucket, pg_migrated_url: str) -> None:
    settings, sessions = make(s3_bucket, pg_migrated_url, quiet_period_s=0.0)
    for i in range(30):
        put(s3_bucket, f"exports/S{i:02d}/1.dcm")
    sent = Sent()
    barrier = threading.Barrier(2)

    def worker() -> None:
        barrier.wait()
        poll(s3_bucket, settings, db.session_factory(db.make_engine(pg_migrated_url)), sent)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    run_ids = [run_id for run_id, _ in sent.messages]
    assert len(run_ids) == 30 and len(set(run_ids)) == 30
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Run)) == 30


def test_stale_queued_runs_are_sent_again(s3_bucket: S3Bucket, pg_migrated_url: str) -> None:
    settings, sessions = make(s3_bucket, pg_migrated_url, quiet_period_s=0.0)
    put(s3_bucket, "exports/A/1.dcm")
    first = Sent()
    poll(s3_bucket, settings, sessions, first)
    soon = Sent()
    poll(s3_bucket, settings, sessions, soon, now=datetime.now(UTC) + timedelta(seconds=60))
    assert soon.messages == []
    late = Sent()
    report = poll(
        s3_bucket, settings, sessions, late, now=datetime.now(UTC) + timedelta(seconds=settings.queued_timeout_s + 5)
    )
    assert report.resent == 1 and late.messages == first.messages  # same run, same task id


def test_lost_workers_are_requeued_then_dead(s3_bucket: S3Bucket, pg_migrated_url: str) -> None:
    settings, sessions = make(s3_bucket, pg_migrated_url, quiet_period_s=0.0, max_attempts=2)
    put(s3_bucket, "exports/A/1.dcm")
    poll(s3_bucket, settings, sessions, Sent())
    long_ago = datetime.now(UTC) - timedelta(seconds=settings.hard_time_limit_s + 120)
    with db.transaction(sessions) as s:
        s.execute(update(Run).values(state=RunState.RUNNING, started_at=long_ago, attempts=1))
    requeue = Sent()
    report = poll(s3_bucket, settings, sessions, requeue)
    assert (report.resent, report.dead, len(requeue.messages)) == (1, 0, 1)
    with db.transaction(sessions) as s:
        s.execute(update(Run).values(state=RunState.RUNNING, started_at=long_ago, attempts=2))
    report = poll(s3_bucket, settings, sessions, Sent())
    assert report.dead == 1
    with sessions() as s:
        run = s.scalars(select(Run)).one()
    assert run.state is RunState.DEAD and run.error_code == "worker_lost"
    assert "hard time limit" in (run.error_message or "")


def test_a_failed_send_is_retried_by_the_next_poll(s3_bucket: S3Bucket, pg_migrated_url: str) -> None:
    settings, sessions = make(s3_bucket, pg_migrated_url, quiet_period_s=0.0)
    put(s3_bucket, "exports/A/1.dcm")
    report = poll(s3_bucket, settings, sessions, Sent(fail=True))
    assert report.send_failures == 1 and report.enqueued == 0
    retry = Sent()
    assert poll(s3_bucket, settings, sessions, retry).resent == 1
    assert len(retry.messages) == 1


def test_a_poll_costs_a_constant_number_of_statements(tmp_path, pg_migrated_url: str) -> None:  # type: ignore[no-untyped-def]
    """No per-object or per-study database round trip: the count does not grow with the bucket."""
    from sqlalchemy import event

    from worker.infra.storage import LocalStore

    engine = db.make_engine(pg_migrated_url)
    sessions = db.session_factory(engine)

    def statements_for(n_studies: int, root: str) -> tuple[int, int]:
        bucket = tmp_path / root
        for s in range(n_studies):
            (bucket / f"S{s:04d}").mkdir(parents=True)
            for i in range(5):
                (bucket / f"S{s:04d}" / f"{i}.dcm").write_bytes(b"x")
        settings = Settings.from_env({}).replace(
            database_url=pg_migrated_url, export_bucket=str(bucket), quiet_period_s=0
        )
        counts = []
        for _ in range(2):  # first poll registers, second finds nothing new
            seen = 0

            def count(*_: object) -> None:
                nonlocal seen
                seen += 1

            event.listen(engine, "before_cursor_execute", count)
            poll_once(store=LocalStore(bucket), sessions=sessions, settings=settings, model=MODEL, enqueue=Sent())
            event.remove(engine, "before_cursor_execute", count)
            counts.append(seen)
        return counts[0], counts[1]

    small = statements_for(3, "small")
    large = statements_for(120, "large")
    assert small == large, (small, large)
    assert large[1] <= 4
