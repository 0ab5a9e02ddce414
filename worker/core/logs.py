"""Logging: configured once per process, identifiers bound per task, never patient data.

Modules log through ``logging.getLogger(__name__)``. :func:`configure_logging` installs
one handler on the ``ichvol`` loggers' root (``worker`` and ``scheduler``) without
hijacking the process root logger (Celery keeps its own). :func:`log_context` binds
run and study identifiers (never names, patient IDs or birth dates) to every record
emitted inside it, also across threads started inside the context.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_context: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("ichvol_log_context", default={})  # noqa: B039

PROJECT_LOGGERS = ("worker", "scheduler")


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.ichvol_context = dict(_context.get())
        return True


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        context = getattr(record, "ichvol_context", None)
        if context:
            base += " " + " ".join(f"{k}={v}" for k, v in sorted(context.items()))
        return base


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        payload.update(getattr(record, "ichvol_context", {}) or {})
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def configure_logging(*, level: str = "INFO", fmt: str = "text", stream: Any = None) -> None:
    """Install the project's handler (idempotent: reconfiguring replaces it)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(_ContextFilter())
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.set_name("ichvol")
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if h.get_name() == "ichvol"]:
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(level.upper())
        logger.propagate = False


@contextmanager
def log_context(**ids: Any) -> Iterator[None]:
    """Bind identifiers (run_id, study_id, task_id, ...) to log records inside the block."""
    token = _context.set({**_context.get(), **{k: v for k, v in ids.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)
