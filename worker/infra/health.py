"""``ichvol check``: do the database, the broker and the buckets answer? (readiness probes)"""

from __future__ import annotations

from collections.abc import Sequence

from worker.core.errors import IchvolError
from worker.core.settings import Settings


def check_db(settings: Settings) -> str:
    from sqlalchemy import text

    from worker.infra import db

    engine = db.make_engine(settings.database_url)
    try:
        with db.map_db_errors(), engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    finally:
        engine.dispose()
    return "answers"


def check_broker(settings: Settings) -> str:
    from kombu import Connection  # type: ignore[attr-defined]

    with Connection(settings.broker_url, connect_timeout=5) as conn:  # type: ignore[no-untyped-call]
        conn.ensure_connection(max_retries=1, interval_start=0, timeout=5)
    return "answers"


def check_buckets(settings: Settings) -> str:
    from itertools import islice

    from worker.infra import storage

    for name in (settings.export_bucket, settings.results_bucket):
        store = storage.open_store(name, settings)
        list(islice(store.iter_objects(""), 1))
    return f"{settings.export_bucket} and {settings.results_bucket} readable"


CHECKS = {"db": check_db, "broker": check_broker, "s3": check_buckets}


def run_checks(settings: Settings, names: Sequence[str]) -> dict[str, tuple[bool, str]]:
    """Run the named checks; each gives (ok, detail). Never raises for an unreachable service."""
    results: dict[str, tuple[bool, str]] = {}
    for name in names:
        try:
            results[name] = (True, CHECKS[name](settings))
        except IchvolError as exc:
            results[name] = (False, exc.message)
        except Exception as exc:
            results[name] = (False, f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
    return results
