"""Alembic environment: where the URL comes from, timeouts, SQLite batch mode.

The URL, first found wins: ``config.attributes["url"]`` (``worker.infra.db.upgrade_to_head``,
tests), ``-x url=...`` (command line), ``ICHVOL_DATABASE_URL`` via
``worker.core.settings.Settings``. A caller may also hand over an open connection in
``config.attributes["connection"]``.

PostgreSQL: ``lock_timeout`` keeps a migration from queueing behind a long query while
it holds every later query up (retry it instead); ``statement_timeout`` bounds each DDL
statement. Both can be changed with ``-x lock_timeout=10s -x statement_timeout=30min``.

SQLite: ``render_as_batch`` (ALTER via table copies), foreign keys off while migrating
(a table copy would otherwise cascade deletes), checked afterwards, and the whole
upgrade in one transaction.
"""

from __future__ import annotations

import re
from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection

from worker.infra.db import make_engine
from worker.infra.tables import Base

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata

LOCK_TIMEOUT = "5s"
STATEMENT_TIMEOUT = "15min"
_DURATION = re.compile(r"^\d+(ms|s|min|h)?$")


def _url() -> str:
    url = config.attributes.get("url") or context.get_x_argument(as_dictionary=True).get("url")
    if url:
        return str(url)
    from worker.core.settings import Settings

    return Settings.from_env().database_url


def _duration(name: str, default: str) -> str:
    value = context.get_x_argument(as_dictionary=True).get(name, default)
    if not _DURATION.match(value):
        raise ValueError(f"-x {name}={value!r}: expected a PostgreSQL duration such as 5s or 15min")
    return value


def _configure(connection: Connection) -> None:
    sqlite = connection.dialect.name == "sqlite"
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=sqlite,
        transactional_ddl=True,
        compare_type=True,
        compare_server_default=False,
    )


def _run(connection: Connection) -> None:
    dialect = connection.dialect.name
    if dialect == "postgresql":
        lock_timeout = _duration("lock_timeout", LOCK_TIMEOUT)
        statement_timeout = _duration("statement_timeout", STATEMENT_TIMEOUT)
        connection.exec_driver_sql(f"SET lock_timeout = '{lock_timeout}'")
        connection.exec_driver_sql(f"SET statement_timeout = '{statement_timeout}'")
        connection.commit()  # session settings stay; the migration gets its own transaction
    sqlite_raw = None
    if dialect == "sqlite" and not connection.in_transaction():
        # PRAGMA foreign_keys is ignored inside a transaction: set it on the raw connection.
        sqlite_raw = connection.connection.driver_connection
        assert sqlite_raw is not None
        sqlite_raw.execute("PRAGMA foreign_keys=OFF")
        # Batch ALTERs rename tables; without this SQLite also rewrites (and breaks) the views.
        sqlite_raw.execute("PRAGMA legacy_alter_table=ON")
    try:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
            if dialect == "sqlite":
                broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise RuntimeError(f"foreign keys broken by the migration: {broken[:5]}")
    finally:
        if sqlite_raw is not None:
            sqlite_raw.execute("PRAGMA foreign_keys=ON")


def run_migrations_offline() -> None:
    """``alembic upgrade head --sql``: print the SQL instead of running it."""
    url = _url()
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=url.startswith("sqlite"),
        transactional_ddl=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    given = config.attributes.get("connection")
    if given is not None:
        _run(given)
        return
    engine = make_engine(_url())
    try:
        with engine.connect() as connection:
            _run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
