"""Per-process worker state: dependencies built after the fork, the loaded model, status.

A Celery prefork worker is one parent process (consumes messages, answers remote
control) and pool processes (run tasks). The parent never imports TensorFlow. Each pool
process builds its own database engine, S3 clients and segmenter in
:func:`init_pool_process`, and keeps a small status file (model loaded, device,
studies processed) that the parent reads to answer ``inspect model_info``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from worker.core.errors import IchvolError, ModelFileError
from worker.core.settings import Settings
from worker.overnight.deps import WorkerDeps, build_deps

log = logging.getLogger(__name__)


_deps: WorkerDeps | None = None
_deps_pid: int | None = None
_status: dict[str, Any] = {}


def get_deps(settings: Settings | None = None) -> WorkerDeps:
    """This process's dependencies (rebuilt after a fork: connections are not shared)."""
    global _deps, _deps_pid
    if _deps is None or _deps_pid != os.getpid():
        _deps = build_deps(settings or Settings.from_env())
        _deps_pid = os.getpid()
    return _deps


def set_deps(deps: WorkerDeps | None) -> None:
    """Install dependencies explicitly (the embedded demo and tests)."""
    global _deps, _deps_pid
    _deps, _deps_pid = deps, (os.getpid() if deps is not None else None)


def record_hard_time_limit(settings: Settings, *, run_id: int, task_id: str | None) -> None:
    """In the worker's parent: record a run whose pool process the hard time limit killed.

    Builds short-lived dependencies (an engine and S3 clients; never the model) and
    disposes of them: the parent forks new pool processes and must not hold connections.
    Database or S3 trouble is logged; the scheduler's recovery then handles the run.
    """
    from worker.overnight.processing import record_hard_time_limit as record

    deps: WorkerDeps | None = None
    try:
        deps = build_deps(settings)
        record(deps, run_id=run_id, task_id=task_id, limit_s=settings.hard_time_limit_s)
    except IchvolError as exc:
        log.error("could not record the hard time limit of run %s: %s", run_id, exc.message)
    finally:
        if deps is not None:
            with contextlib.suppress(KeyError, AttributeError):
                deps.sessions.kw["bind"].dispose()


# --- status shared with the parent ---------------------------------------------------------


def _state_dir(settings: Settings, parent_pid: int) -> Path:
    return Path(settings.work_dir) / "worker-state" / f"{socket.gethostname()}-{parent_pid}"


def init_parent(settings: Settings) -> None:
    directory = _state_dir(settings, os.getpid())
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.json"):
        old.unlink(missing_ok=True)


def _write_status() -> None:
    deps = _deps
    if deps is None:
        return
    directory = _state_dir(deps.settings, os.getppid())
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{os.getpid()}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**_status, "pid": os.getpid(), "updated_at": time.time()}))
    tmp.replace(path)


def init_pool_process(settings: Settings) -> None:
    """Runs in each pool process after the fork: build dependencies and load the model."""
    from worker.core.logs import configure_logging, route_warnings

    configure_logging(level=settings.log_level, fmt=settings.log_format)
    route_warnings()  # one log line each, without the quoted values (patient names)
    _status.clear()
    _status.update(loaded=False, device=None, engine=None, load_error=None, succeeded=0, failed=0)
    try:
        deps = get_deps(settings)
    except IchvolError as exc:
        log.error("worker dependencies unavailable: %s", exc.message)
        _status["load_error"] = exc.message
        return
    try:
        segmenter = deps.segmenter  # load now, not on the first study
        from worker.model import framework

        engine = str(getattr(segmenter, "engine", "keras"))  # the concrete one: `auto` resolved
        _status.update(loaded=True, device=framework.device_description(), engine=engine)
    except ModelFileError as exc:
        log.error("model could not be loaded: %s", exc.message)
        _status["load_error"] = exc.message
    _write_status()


def shutdown_pool_process() -> None:
    deps = _deps
    if deps is not None:
        with contextlib.suppress(KeyError, AttributeError):
            deps.sessions.kw["bind"].dispose()


def record_processed(*, succeeded: bool) -> None:
    key = "succeeded" if succeeded else "failed"
    _status[key] = int(_status.get(key, 0)) + 1
    _write_status()


def children_status(settings: Settings) -> list[dict[str, Any]]:
    """Status files of this worker's pool processes (read by the parent)."""
    directory = _state_dir(settings, os.getpid())
    rows = []
    for path in sorted(directory.glob("*.json")):
        try:
            rows.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return rows
