"""Database plumbing: engines, sessions, transactions, idempotent inserts, migrations.

* :func:`make_engine` -- one engine per process, created *after* fork (a Celery worker's
  child, not its parent). Connections carried across a fork are discarded on checkout.
* :func:`session_factory` and :func:`transaction` -- one transaction per unit of work;
  commit on success, rollback on any exception.
* :func:`insert_ignore` -- ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` on PostgreSQL
  and SQLite: how the scheduler registers studies and runs idempotently, in one round
  trip per batch, learning which rows are new.
* :func:`upgrade_to_head` -- Alembic, programmatically. The migrations own the schema.
* Connection trouble (``OperationalError``, ``InterfaceError``, ``DisconnectionError``)
  becomes :class:`worker.core.errors.TransientError` (:func:`map_db_errors`).

SQLite (the embedded default) gets foreign keys, WAL, a busy timeout, and
``BEGIN IMMEDIATE`` for every transaction: concurrent writers then wait for each other
(up to the busy timeout) instead of failing half-way with "database is locked".
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Row, Table, create_engine, event, exc, inspect
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry

from worker.core.errors import TransientError

#: Longest a single SQL statement may run on PostgreSQL before the server cancels it.
STATEMENT_TIMEOUT_MS = 60_000
#: Longest a statement waits for a row or table lock on PostgreSQL.
LOCK_TIMEOUT_MS = 30_000
#: SQLite: how long a writer waits for another writer's transaction to finish.
SQLITE_BUSY_TIMEOUT_S = 30.0

REPO_ROOT = Path(__file__).resolve().parents[2]
MIGRATIONS_DIR = REPO_ROOT / "migrations"
ALEMBIC_INI = REPO_ROOT / "alembic.ini"

# SQLite reports programming errors (a missing table, bad SQL) as OperationalError too:
# those are bugs or a database not migrated, not trouble that passes by waiting.
_SQLITE_PERMANENT_MESSAGES = (
    "no such table",
    "no such column",
    "has no column named",
    "no such function",
    "no such index",
    "syntax error",
    "already exists",
)


def _is_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite"


def make_engine(
    url: str,
    *,
    statement_timeout_ms: int = STATEMENT_TIMEOUT_MS,
    lock_timeout_ms: int = LOCK_TIMEOUT_MS,
    sqlite_busy_timeout_s: float = SQLITE_BUSY_TIMEOUT_S,
    echo: bool = False,
) -> Engine:
    """An engine for ``url`` (``postgresql+psycopg2://...`` or ``sqlite:///path``).

    Create it in the process that uses it, after any fork. ``pool_pre_ping`` replaces
    connections the server closed; SQL parameters are hidden from error messages (they
    can hold patient identifiers). PostgreSQL sessions get ``statement_timeout`` and
    ``lock_timeout``; SQLite connections get foreign keys, WAL (files only), a busy
    timeout and ``BEGIN IMMEDIATE`` transactions.
    """
    parsed = make_url(url)
    kwargs: dict[str, Any] = {"pool_pre_ping": True, "hide_parameters": True, "echo": echo}
    if parsed.get_backend_name() == "postgresql":
        options = f"-c statement_timeout={int(statement_timeout_ms)} -c lock_timeout={int(lock_timeout_ms)}"
        kwargs["connect_args"] = {"options": options, "application_name": "ichvol"}
    elif _is_sqlite(parsed):
        kwargs["connect_args"] = {"timeout": sqlite_busy_timeout_s}
    engine = create_engine(parsed, **kwargs)
    if _is_sqlite(parsed):
        _configure_sqlite(engine, parsed, busy_timeout_s=sqlite_busy_timeout_s)
    _discard_connections_after_fork(engine)
    return engine


def _configure_sqlite(engine: Engine, url: URL, *, busy_timeout_s: float) -> None:
    in_memory = url.database in (None, "", ":memory:") or "mode=memory" in str(url.query.get("mode", ""))

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide where transactions begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
            if not in_memory:
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        # Take the write lock at the start: a deferred transaction that reads, then writes
        # after another writer committed, fails at once (SQLITE_BUSY_SNAPSHOT) in WAL mode.
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def _discard_connections_after_fork(engine: Engine) -> None:
    """Never reuse a connection opened by another process (the SQLAlchemy pooling recipe)."""

    @event.listens_for(engine, "connect")
    def _remember_pid(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        record.info["pid"] = os.getpid()

    @event.listens_for(engine, "checkout")
    def _check_pid(dbapi_connection: Any, record: Any, proxy: Any) -> None:  # a _ConnectionRecord
        pid = os.getpid()
        if record.info.get("pid") != pid:
            # Drop (do not close) the parent's connection: its socket is the parent's.
            record.dbapi_connection = proxy.dbapi_connection = None
            raise exc.DisconnectionError(
                f"connection opened in process {record.info.get('pid')}, used in process {pid}"
            )


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions bound to ``engine``; objects stay readable after commit (no expiry)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


def is_transient_db_error(error: BaseException) -> bool:
    """Whether ``error`` is database trouble that may pass (connection lost, timeout, lock)."""
    if isinstance(error, exc.DisconnectionError | exc.InterfaceError):
        return True
    if isinstance(error, exc.OperationalError):
        orig = error.orig
        if type(orig).__module__.startswith("sqlite3") and not error.connection_invalidated:
            message = str(orig).lower()
            return not any(text in message for text in _SQLITE_PERMANENT_MESSAGES)
        return True
    return False


def _describe(error: BaseException) -> str:
    # Only the driver's message: SQLAlchemy's own str() holds the SQL statement.
    orig = getattr(error, "orig", None) or error
    first_line = (str(orig).strip().splitlines() or [""])[0]
    return f"{type(orig).__name__}: {first_line}"[:300]


@contextmanager
def map_db_errors() -> Iterator[None]:
    """Re-raise transient database errors as :class:`TransientError` (retried by the caller)."""
    try:
        yield
    except exc.DBAPIError as error:
        if is_transient_db_error(error):
            raise TransientError(f"database unavailable ({_describe(error)}); retry later") from error
        raise
    except exc.DisconnectionError as error:
        raise TransientError(f"database connection lost ({_describe(error)}); retry later") from error


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session in one transaction: committed when the block ends, rolled back on any error.

    Connection trouble inside the block or at commit raises :class:`TransientError`.
    """
    with map_db_errors(), factory() as session, session.begin():
        yield session


def _table_of(table: Table | type[DeclarativeBase]) -> Table:
    if isinstance(table, Table):
        return table
    local = inspect(table).local_table
    if not isinstance(local, Table):
        raise TypeError(f"{table!r} is not mapped to a table")
    return local


def _in_key_order(rows: list[dict[str, Any]], columns: Sequence[str]) -> list[dict[str, Any]]:
    """Rows sorted by their conflict key: concurrent inserters then take the unique-index
    locks in one order, and cannot deadlock on each other (PostgreSQL)."""
    try:
        return sorted(rows, key=lambda row: tuple((row.get(c) is None, row.get(c)) for c in columns))
    except TypeError:  # values of mixed types: keep the given order
        return rows


def insert_ignore(
    session: Session,
    table: Table | type[DeclarativeBase],
    rows: Sequence[Mapping[str, Any]],
    *,
    conflict_columns: Sequence[str],
    returning: Sequence[str] | None = None,
) -> list[Row[Any]]:
    """Insert ``rows``, skipping those that conflict on ``conflict_columns``; return the new ones.

    ``conflict_columns`` must be the columns of a unique constraint or index (PostgreSQL
    infers the arbiter from them). ``returning`` names the columns returned for each row
    actually inserted (default: the primary key); rows that already existed, or that
    another transaction inserted first, are not returned. So when two sessions race on
    the same keys, each key comes back to exactly one of them (on PostgreSQL the second
    waits for the first to commit or roll back; on SQLite the writers are serialised).

    One ``INSERT ... ON CONFLICT (...) DO NOTHING RETURNING ...`` per batch of rows
    (SQLAlchemy's "insertmanyvalues"), within the session's transaction. The rows of
    one call are inserted in conflict-key order, so concurrent calls cannot deadlock on
    each other; the order of the returned rows is not guaranteed: return a key column
    to match them up.
    """
    target = _table_of(table)
    missing = [name for name in conflict_columns if name not in target.c]
    if not conflict_columns or missing:
        raise ValueError(f"conflict_columns must name columns of {target.name}: {list(conflict_columns)}")
    if returning is None:
        returned = list(target.primary_key.columns)
    else:
        unknown = [name for name in returning if name not in target.c]
        if unknown or not returning:
            raise ValueError(f"returning must name columns of {target.name}: {list(returning)}")
        returned = [target.c[name] for name in returning]
    if not rows:
        return []
    values = _in_key_order([dict(row) for row in rows], conflict_columns)
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        pg_stmt = pg_insert(target).on_conflict_do_nothing(index_elements=list(conflict_columns))
        stmt: Any = pg_stmt.returning(*returned)
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        lite_stmt = sqlite_insert(target).on_conflict_do_nothing(index_elements=list(conflict_columns))
        stmt = lite_stmt.returning(*returned)
    else:
        raise NotImplementedError(f"insert_ignore supports PostgreSQL and SQLite, not {dialect}")
    with map_db_errors():
        result = session.execute(stmt, values)
        return list(result.all())


# --------------------------------------------------------------------------------------------
# migrations


def alembic_config(url: str | None = None) -> Any:
    """The Alembic configuration of this repository, for ``url`` (None: the settings' URL).

    Built in code (``script_location`` = ``migrations/`` beside the package), so it works
    from any working directory and does not configure logging.
    """
    from alembic.config import Config

    if not MIGRATIONS_DIR.is_dir():
        raise FileNotFoundError(
            f"Alembic migrations not found at {MIGRATIONS_DIR}: run from a source checkout or image"
        )
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        config.attributes["url"] = url
    return config


def upgrade_to_head(url: str) -> None:
    """Migrate the database at ``url`` to the newest schema (``alembic upgrade head``)."""
    from alembic import command

    with map_db_errors():
        command.upgrade(alembic_config(url), "head")


def current_revision(url: str) -> str | None:
    """The Alembic revision the database at ``url`` is at (None: not migrated)."""
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url)
    try:
        with map_db_errors(), engine.connect() as connection:
            rev = MigrationContext.configure(connection).get_current_revision()
            return None if rev is None else str(rev)
    finally:
        engine.dispose()


def rowcount(result: Any) -> int:
    """Rows matched by an UPDATE or DELETE (``CursorResult.rowcount``, typed)."""
    return int(result.rowcount)
