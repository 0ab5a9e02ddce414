"""worker.infra.db and worker.infra.tables on real PostgreSQL and on SQLite (both migrated with Alembic)."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, delete, func, select, text
from sqlalchemy.exc import IntegrityError, OperationalError, StatementError
from sqlalchemy.orm import Session, sessionmaker

from tests.helpers.services import free_ports
from worker.core.errors import TransientError
from worker.infra import db
from worker.infra.tables import Result, Run, RunState, Study

pytestmark = pytest.mark.integration

FINGERPRINT = "f" * 64


@pytest.fixture(params=["postgresql", "sqlite"])
def migrated_url(request: pytest.FixtureRequest) -> str:
    name = "pg_migrated_url" if request.param == "postgresql" else "sqlite_migrated_url"
    return str(request.getfixturevalue(name))


@pytest.fixture()
def engine(migrated_url: str) -> Iterator[Engine]:
    engine = db.make_engine(migrated_url)
    yield engine
    engine.dispose()


@pytest.fixture()
def sessions(engine: Engine) -> sessionmaker[Session]:
    return db.session_factory(engine)


def study_row(prefix: str = "exports/S1/", fingerprint: str = FINGERPRINT, **extra: Any) -> dict[str, Any]:
    return {
        "bucket": "pacs-export",
        "prefix": prefix,
        "fingerprint": fingerprint,
        "n_objects": 3,
        "total_bytes": 1536,
        **extra,
    }


def add_study(sessions: sessionmaker[Session], **extra: Any) -> int:
    with db.transaction(sessions) as session:
        study = Study(**study_row(**extra))
        session.add(study)
        session.flush()
        return study.id


def add_run(sessions: sessionmaker[Session], study_id: int, model_version: str = "1.0.0") -> int:
    with db.transaction(sessions) as session:
        run = Run(study_id=study_id, model_name="DR-UNet", model_version=model_version, model_sha256="a" * 64)
        session.add(run)
        session.flush()
        return run.id


def result_for(run_id: int) -> Result:
    return Result(
        run_id=run_id,
        series_instance_uid="1.2.3",
        volume_ml=12.5,
        abc2_ml=14.0,
        n_slices=28,
        pixel_spacing_row_mm=0.488,
        pixel_spacing_col_mm=0.488,
        slab_thickness_mean_mm=4.8,
        timings_s={"load": 1.5, "infer": 3.25},
        result_uri="s3://results/r.json",
    )


# --------------------------------------------------------------------------------------------
# engines


def test_sqlite_connections_are_configured(sqlite_migrated_url: str) -> None:
    engine = db.make_engine(sqlite_migrated_url, sqlite_busy_timeout_s=7.5)
    try:
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 7500
    finally:
        engine.dispose()


def test_postgresql_sessions_have_timeouts(pg_migrated_url: str) -> None:
    engine = db.make_engine(pg_migrated_url, statement_timeout_ms=1234, lock_timeout_ms=567)
    try:
        with engine.connect() as connection:
            assert connection.exec_driver_sql("SHOW statement_timeout").scalar() == "1234ms"
            assert connection.exec_driver_sql("SHOW lock_timeout").scalar() == "567ms"
    finally:
        engine.dispose()


def test_statement_timeout_is_transient(pg_migrated_url: str) -> None:
    engine = db.make_engine(pg_migrated_url, statement_timeout_ms=100)
    try:
        with (
            pytest.raises(TransientError, match="database unavailable"),
            db.transaction(db.session_factory(engine)) as session,
        ):
            session.execute(text("SELECT pg_sleep(2)"))
    finally:
        engine.dispose()


def test_unreachable_database_is_transient() -> None:
    (port,) = free_ports(1)
    engine = db.make_engine(f"postgresql+psycopg2://postgres@127.0.0.1:{port}/nothing")
    try:
        with pytest.raises(TransientError) as info, db.transaction(db.session_factory(engine)) as session:
            session.execute(text("SELECT 1"))
        assert "OperationalError" in info.value.message
    finally:
        engine.dispose()


def test_sqlite_programming_errors_are_not_transient(sqlite_migrated_url: str) -> None:
    engine = db.make_engine(sqlite_migrated_url)
    try:
        with pytest.raises(OperationalError) as info, db.transaction(db.session_factory(engine)) as session:
            session.execute(text("SELECT * FROM no_such_table"))
        assert not db.is_transient_db_error(info.value)
    finally:
        engine.dispose()


def test_sqlite_lock_timeout_is_transient(sqlite_migrated_url: str) -> None:
    holder = db.make_engine(sqlite_migrated_url)
    waiter = db.make_engine(sqlite_migrated_url, sqlite_busy_timeout_s=0.2)
    try:
        with holder.connect() as connection, connection.begin():
            connection.execute(text("SELECT 1"))  # BEGIN IMMEDIATE: holds the write lock
            with (
                pytest.raises(TransientError, match="locked"),
                db.transaction(db.session_factory(waiter)) as session,
            ):
                session.execute(text("SELECT 1"))
    finally:
        holder.dispose()
        waiter.dispose()


def _child_backend_pid(engine: Engine, queue: Any) -> None:
    with engine.connect() as connection:
        queue.put(connection.exec_driver_sql("SELECT pg_backend_pid()").scalar())


def test_connections_are_not_shared_across_fork(pg_migrated_url: str) -> None:
    engine = db.make_engine(pg_migrated_url)
    try:
        with engine.connect() as connection:
            parent_pid = connection.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=_child_backend_pid, args=(engine, queue))
        child.start()
        child_pid = queue.get(timeout=30)
        child.join(timeout=30)
        assert child.exitcode == 0
        assert child_pid != parent_pid  # the child opened its own connection
        with engine.connect() as connection:  # and left the parent's one alone
            assert connection.exec_driver_sql("SELECT pg_backend_pid()").scalar() == parent_pid
    finally:
        engine.dispose()


# --------------------------------------------------------------------------------------------
# tables


def test_transaction_commits_or_rolls_back(sessions: sessionmaker[Session]) -> None:
    with pytest.raises(RuntimeError), db.transaction(sessions) as session:
        session.add(Study(**study_row(prefix="rolled/back/")))
        session.flush()
        raise RuntimeError("boom")
    study_id = add_study(sessions)
    with db.transaction(sessions) as session:
        assert session.scalars(select(Study.prefix)).all() == ["exports/S1/"]
        assert session.get(Study, study_id) is not None


def test_study_version_is_unique(sessions: sessionmaker[Session]) -> None:
    add_study(sessions)
    add_study(sessions, fingerprint="e" * 64)  # a changed folder is a new version
    add_study(sessions, prefix="exports/S2/")
    with pytest.raises(IntegrityError), db.transaction(sessions) as session:
        session.add(Study(**study_row()))


def test_one_run_per_study_and_model_version(sessions: sessionmaker[Session]) -> None:
    study_id = add_study(sessions)
    add_run(sessions, study_id, "1.0.0")
    add_run(sessions, study_id, "1.1.0")
    with pytest.raises(IntegrityError):
        add_run(sessions, study_id, "1.0.0")


def test_one_result_per_run(sessions: sessionmaker[Session]) -> None:
    run_id = add_run(sessions, add_study(sessions))
    with db.transaction(sessions) as session:
        session.add(result_for(run_id))
    with pytest.raises(IntegrityError), db.transaction(sessions) as session:
        session.add(result_for(run_id))


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO runs (study_id, model_name, model_version, model_sha256, state) "
        "VALUES (:study_id, 'm', 'v', 's', 'exploded')",
        "INSERT INTO runs (study_id, model_name, model_version, model_sha256, attempts) "
        "VALUES (:study_id, 'm', 'v', 's', -1)",
        "INSERT INTO runs (study_id, model_name, model_version, model_sha256) VALUES (:study_id + 1000, 'm', 'v', 's')",
        "INSERT INTO studies (bucket, prefix, fingerprint, n_objects, total_bytes) VALUES ('b', 'p', 'short', 1, 1)",
    ],
)
def test_database_constraints(sessions: sessionmaker[Session], sql: str) -> None:
    study_id = add_study(sessions)
    with pytest.raises(IntegrityError), db.transaction(sessions) as session:
        session.execute(text(sql), {"study_id": study_id})


def test_state_is_stored_by_value_and_defaults(sessions: sessionmaker[Session]) -> None:
    run_id = add_run(sessions, add_study(sessions))
    with db.transaction(sessions) as session:
        assert session.execute(text("SELECT state, attempts FROM runs")).one() == ("queued", 0)
        run = session.get(Run, run_id)
        assert run is not None and run.state is RunState.QUEUED
        run.state = RunState.SUCCEEDED
    with db.transaction(sessions) as session:
        assert session.execute(text("SELECT state FROM runs")).scalar() == "succeeded"
        assert session.scalars(select(Run).where(Run.state == RunState.SUCCEEDED)).one().id == run_id


def test_times_are_aware_utc(sessions: sessionmaker[Session]) -> None:
    before = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)
    paris = dt.timezone(dt.timedelta(hours=2))
    acquired = dt.datetime(2024, 3, 1, 14, 30, 15, 250000, tzinfo=paris)
    study_id = add_study(sessions, study_datetime=acquired, study_date=dt.date(2024, 3, 1), study_time=dt.time(14, 30))
    with db.transaction(sessions) as session:
        study = session.get(Study, study_id)
        assert study is not None
        session.refresh(study)
        assert study.study_datetime == acquired
        assert study.study_datetime is not None and study.study_datetime.tzinfo is dt.UTC
        assert study.study_datetime.hour == 12
        assert study.discovered_at.tzinfo is dt.UTC
        assert before <= study.discovered_at <= dt.datetime.now(dt.UTC) + dt.timedelta(seconds=5)
        assert study.study_date == dt.date(2024, 3, 1) and study.study_time == dt.time(14, 30)
    with pytest.raises(StatementError, match="naive datetime"), db.transaction(sessions) as session:
        session.add(Study(**study_row(prefix="naive/", study_datetime=dt.datetime(2024, 3, 1, 14, 30))))


def test_result_round_trip_and_cascade(sessions: sessionmaker[Session]) -> None:
    study_id = add_study(sessions)
    run_id = add_run(sessions, study_id)
    with db.transaction(sessions) as session:
        session.add(result_for(run_id))
    with db.transaction(sessions) as session:
        run = session.get(Run, run_id)
        assert run is not None and run.result is not None
        assert run.result.timings_s == {"load": 1.5, "infer": 3.25}
        assert run.result.volume_ml == 12.5 and run.result.mask_npz_uri is None
        assert run.study.id == study_id
    with db.transaction(sessions) as session:
        session.execute(delete(Study).where(Study.id == study_id))  # the database cascades
    with db.transaction(sessions) as session:
        assert session.scalar(select(func.count()).select_from(Run)) == 0
        assert session.scalar(select(func.count()).select_from(Result)) == 0


# --------------------------------------------------------------------------------------------
# insert_ignore

STUDY_KEY = ["bucket", "prefix", "fingerprint"]


def test_insert_ignore_returns_only_new_rows(sessions: sessionmaker[Session]) -> None:
    with db.transaction(sessions) as session:
        first = db.insert_ignore(
            session,
            Study,
            [study_row(f"S{i}/") for i in range(3)],
            conflict_columns=STUDY_KEY,
            returning=["id", "prefix"],
        )
    assert sorted(r.prefix for r in first) == ["S0/", "S1/", "S2/"]
    with db.transaction(sessions) as session:
        again = db.insert_ignore(
            session,
            Study,
            [study_row("S1/"), study_row("S3/"), study_row("S3/"), study_row("S1/", fingerprint="1" * 64)],
            conflict_columns=STUDY_KEY,
            returning=["prefix", "fingerprint"],
        )
    assert sorted((r.prefix, r.fingerprint) for r in again) == [("S1/", "1" * 64), ("S3/", FINGERPRINT)]
    with db.transaction(sessions) as session:
        assert session.scalar(select(func.count()).select_from(Study)) == 5
        # default: the primary key
        (row,) = db.insert_ignore(session, Study.__table__, [study_row("S9/")], conflict_columns=STUDY_KEY)  # type: ignore[arg-type]
        assert set(row._mapping) == {"id"}
        assert db.insert_ignore(session, Study, [], conflict_columns=STUDY_KEY) == []


def test_insert_ignore_runs_with_enum_state(sessions: sessionmaker[Session]) -> None:
    study_id = add_study(sessions)
    rows = [
        {
            "study_id": study_id,
            "model_name": "DR-UNet",
            "model_version": v,
            "model_sha256": "a",
            "state": RunState.QUEUED,
        }
        for v in ("1", "2")
    ]
    with db.transaction(sessions) as session:
        inserted = db.insert_ignore(
            session, Run, rows, conflict_columns=["study_id", "model_version"], returning=["id", "state"]
        )
        assert [r.state for r in inserted] == [RunState.QUEUED, RunState.QUEUED]
        assert db.insert_ignore(session, Run, rows, conflict_columns=["study_id", "model_version"]) == []


def test_insert_ignore_large_batch(sessions: sessionmaker[Session]) -> None:
    rows = [study_row(f"exports/S{i:05d}/") for i in range(2500)]
    with db.transaction(sessions) as session:
        assert len(db.insert_ignore(session, Study, rows[:1000], conflict_columns=STUDY_KEY)) == 1000
    with db.transaction(sessions) as session:
        inserted = db.insert_ignore(session, Study, rows, conflict_columns=STUDY_KEY, returning=["prefix"])
    assert sorted(r.prefix for r in inserted) == [r["prefix"] for r in rows[1000:]]


def test_insert_ignore_rejects_unknown_columns(sessions: sessionmaker[Session]) -> None:
    with db.transaction(sessions) as session:
        with pytest.raises(ValueError, match="conflict_columns"):
            db.insert_ignore(session, Study, [study_row()], conflict_columns=["nope"])
        with pytest.raises(ValueError, match="returning"):
            db.insert_ignore(session, Study, [study_row()], conflict_columns=STUDY_KEY, returning=["nope"])


@pytest.mark.parametrize("first_commits", [True, False])
def test_insert_ignore_waits_for_the_other_transaction(engine: Engine, first_commits: bool) -> None:
    """A second writer of the same keys waits; it gets the rows only if the first rolls back."""
    sessions = db.session_factory(engine)
    rows = [study_row(f"S{i}/") for i in range(20)]
    second_result: list[Any] = []

    def second() -> None:
        with db.transaction(sessions) as session:
            second_result.extend(db.insert_ignore(session, Study, rows, conflict_columns=STUDY_KEY))

    session = sessions()
    try:
        session.begin()
        assert len(db.insert_ignore(session, Study, rows, conflict_columns=STUDY_KEY)) == 20
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.5)
        assert thread.is_alive()  # blocked on the first transaction's rows (or write lock)
        if first_commits:
            session.commit()
        else:
            session.rollback()
    finally:
        session.close()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert len(second_result) == (0 if first_commits else 20)


def test_insert_ignore_race_gives_each_row_to_exactly_one(engine: Engine) -> None:
    sessions = db.session_factory(engine)
    n_threads, n_keys = 4, 300
    barrier = threading.Barrier(n_threads)
    won: list[list[str]] = [[] for _ in range(n_threads)]
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        # overlapping, differently ordered batches
        keys = [f"S{(i * (index + 1)) % n_keys:04d}/" for i in range(n_keys)]
        try:
            barrier.wait(timeout=10)
            for start in range(0, n_keys, 50):
                with db.transaction(sessions) as session:
                    rows = [study_row(k) for k in keys[start : start + 50]]
                    inserted = db.insert_ignore(session, Study, rows, conflict_columns=STUDY_KEY, returning=["prefix"])
                    won[index].extend(r.prefix for r in inserted)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    all_won = [prefix for got in won for prefix in got]
    assert len(all_won) == len(set(all_won))  # nobody got a row twice
    with db.transaction(sessions) as session:
        assert sorted(all_won) == sorted(session.scalars(select(Study.prefix)).all())
    assert set(all_won) == {f"S{i:04d}/" for i in range(n_keys)}  # thread 0 tried every key


def test_sqlite_transactions_take_the_write_lock_at_begin(sqlite_migrated_url: str) -> None:
    """A reader that writes later must not lose to a writer in between (SQLITE_BUSY_SNAPSHOT)."""
    engine = db.make_engine(sqlite_migrated_url)
    sessions = db.session_factory(engine)
    try:
        other = threading.Thread(target=add_study, args=(sessions,), kwargs={"prefix": "other/"})
        with db.transaction(sessions) as session:
            assert session.scalar(select(func.count()).select_from(Study)) == 0
            other.start()
            time.sleep(0.3)
            assert other.is_alive()  # waits for this transaction
            session.add(Study(**study_row(prefix="mine/")))
        other.join(timeout=30)
        with db.transaction(sessions) as session:
            assert sorted(session.scalars(select(Study.prefix)).all()) == ["mine/", "other/"]
    finally:
        engine.dispose()
