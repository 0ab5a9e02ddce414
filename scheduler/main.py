"""The scheduler process: poll the export bucket every interval until stopped.

``python -m scheduler`` runs here, and so does ``ichvol scheduler``, which starts
``python -m scheduler`` in its own place (:mod:`worker.cli.scheduler`). The scheduler
imports only the worker's core, infra and model metadata, never TensorFlow or the task
code; it sends runs by task name (:mod:`scheduler.enqueue`). SIGTERM/SIGINT end
the loop after the poll in progress. Transient trouble (S3, database, broker) is
logged and the next poll tries again; the process does not exit for it.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Sequence
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from worker.core.errors import IchvolError, TransientError
from worker.core.settings import Settings

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--once", action="store_true", help="poll once, print the counts and exit")
    parser.add_argument("--interval", type=float, help="seconds between polls (default ICHVOL_POLL_INTERVAL_S)")
    parser.add_argument("--log-level", help="override ICHVOL_LOG_LEVEL")


def run_scheduler(settings: Settings, *, once: bool = False, stop: threading.Event | None = None) -> int:
    from scheduler.enqueue import celery_sender
    from worker.infra import db, storage
    from worker.infra.intake import poll_once
    from worker.model.weights import model_reference

    stop = stop or threading.Event()
    require_migrated(settings)
    model = model_reference(settings)
    sessions = db.session_factory(db.make_engine(settings.database_url))
    sync_trend_config_at_start(sessions, settings)
    store = storage.open_store(settings.export_bucket, settings)
    enqueue = celery_sender(settings)
    log.info(
        "scheduler polling %s every %.0f s for model %s",
        settings.export_bucket,
        settings.poll_interval_s,
        model.version,
    )
    while True:
        try:
            report = poll_once(store=store, sessions=sessions, settings=settings, model=model, enqueue=enqueue)
            if once:
                print(report.line())
                return 0
        except TransientError as exc:
            log.warning("poll failed, will retry: %s", exc.message)
            if once:
                print(f"ichvol scheduler: {exc.message}")
                return 1
        if stop.wait(settings.poll_interval_s):
            log.info("scheduler stopped")
            return 0


def require_migrated(settings: Settings) -> None:
    from worker.core.errors import ConfigurationError
    from worker.infra import db

    if db.current_revision(settings.database_url) is None:
        raise ConfigurationError("the database has no schema yet: run `alembic upgrade head` first")


def sync_trend_config_at_start(sessions: sessionmaker[Session], settings: Settings) -> None:
    """Copy ICHVOL_PINNED_MODEL_VERSION into the row the trend views read (views cannot read settings)."""
    from worker.infra import db
    from worker.infra.trend_config import sync_trend_config

    try:
        with db.transaction(sessions) as session:
            sync_trend_config(session, settings)
    except TransientError as exc:
        log.warning("trend configuration not synchronised: %s", exc.message)


def main(argv: Sequence[str] | None = None, settings: Settings | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scheduler", description="Poll the PACS export bucket.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_from_args(args, settings)


def run_from_args(args: argparse.Namespace, settings: Settings | None = None) -> int:
    import sys

    from worker.core.logs import configure_logging

    try:
        settings = settings or Settings.from_env()
        if args.interval is not None:
            settings = settings.replace(poll_interval_s=args.interval)
        configure_logging(level=getattr(args, "log_level", None) or settings.log_level, fmt=settings.log_format)
        stop = threading.Event()

        def _stop(signum: int, _frame: Any) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        return run_scheduler(settings, once=args.once, stop=stop)
    except IchvolError as exc:
        print(f"ichvol scheduler: {exc.message}", file=sys.stderr)
        return 2
