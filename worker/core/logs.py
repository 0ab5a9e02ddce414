"""Logging: configured once per process, identifiers bound per task, never patient data.

Modules log through ``logging.getLogger(__name__)``. :func:`configure_logging` installs
one handler on the ``ichvol`` loggers' root (``worker`` and ``scheduler``) without
hijacking the process root logger (Celery keeps its own). :func:`log_context` binds
run and study identifiers (never names, patient IDs or birth dates) to every record
emitted inside it, also across threads started inside the context.

Python warnings (pydicom's on a vendor's odd values, a library's deprecations) never reach
stderr as two-line warnings with a source line: :func:`route_warnings` sends each through
the ``worker.warnings`` logger as one INFO line, quoted values removed (they can be patient
names), at most once per study (:func:`collect_warnings`) or, outside a study, once per
process. The facts a user needs from them go into ``result.json`` ``warnings``
(:mod:`worker.measure.pipeline`).
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, TextIO

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


# --- warnings through logging -----------------------------------------------------------------

WARNINGS_LOGGER = "worker.warnings"

#: Libraries whose every warning is routed (not only the first per code location): the DICOM
#: readers and writers, whose warnings are about the study at hand.
DICOM_LIBRARIES = ("pydicom", "highdicom")

#: A quoted value in a message: from the first quote to the last quote of the same kind
#: (pydicom quotes with repr(), so a name with an apostrophe is double-quoted).
_QUOTED = re.compile(r"(['\"]).*\1", re.S)


def redact_quoted(text: str) -> str:
    """``text`` with every quoted value replaced by ``'…'``: pydicom quotes offending values
    (a patient name, a birth date) in its validation warnings and log records."""
    return _QUOTED.sub("'…'", text)


@dataclass
class CaughtWarnings:
    """The distinct warnings met while one study was measured, in order (see :func:`collect_warnings`).

    ``items`` holds ``(library, category, message)``; messages are as raised (unredacted:
    they stay in memory, and only what :mod:`worker.measure.pipeline` picks goes into
    ``result.json``).
    """

    items: list[tuple[str, str, str]] = field(default_factory=list)
    _seen: set[tuple[str, str, str]] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, key: tuple[str, str, str], item: tuple[str, str, str]) -> bool:
        """Record ``item`` unless ``key`` was seen; whether it was new (thread-safe: writers run in threads)."""
        with self._lock:
            if key in self._seen:
                return False
            self._seen.add(key)
            self.items.append(item)
            return True


_caught: contextvars.ContextVar[CaughtWarnings | None] = contextvars.ContextVar("ichvol_warnings", default=None)
_seen_outside: set[tuple[str, str, str]] = set()
_MAX_SEEN_OUTSIDE = 1000


def _library(filename: str) -> str:
    """The top-level package a warning was raised in (``pydicom`` for .../site-packages/pydicom/valuerep.py)."""
    parts = PurePath(filename).parts
    for marker in ("site-packages", "dist-packages"):
        if marker in parts[:-1]:
            return PurePath(parts[parts.index(marker) + 1]).stem
    return PurePath(filename).stem


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning`` replacement: one log line, once per study (or process)."""
    raw = str(message)
    text = redact_quoted(raw.strip().splitlines()[0] if raw.strip() else "")[:300]
    library = _library(filename)
    key = (library, category.__name__, text)
    caught = _caught.get()
    if caught is not None:
        if not caught.add(key, (library, category.__name__, raw)):
            return
    elif key in _seen_outside:
        return
    elif len(_seen_outside) < _MAX_SEEN_OUTSIDE:
        _seen_outside.add(key)
    logging.getLogger(WARNINGS_LOGGER).info("%s %s: %s", library, category.__name__, text)


def route_warnings() -> None:
    """Send warnings through logging (module docstring) instead of stderr; process-wide.

    Idempotent and cheap: commands call it at start, worker processes after the fork, and
    :func:`collect_warnings` on entry, so that a warning filter reset since (a test's,
    ``warnings.catch_warnings``) is put back. Every warning of :data:`DICOM_LIBRARIES` reaches
    the router (which de-duplicates per study); warnings the filters turn into errors or
    ignore are left to them.
    """
    for library in DICOM_LIBRARIES:
        warnings.filterwarnings("always", module=rf"{library}(\.|$)")
    warnings.showwarning = _show_warning


@contextmanager
def collect_warnings() -> Iterator[CaughtWarnings]:
    """Route warnings (:func:`route_warnings`) and collect the distinct ones raised in this block.

    Per context: a thread started inside the block collects into it only if it runs in a copy
    of this context (``contextvars.copy_context().run``, as the pipeline's writers do), so a
    read-ahead thread's warnings are not this study's.
    """
    route_warnings()
    caught = CaughtWarnings()
    token = _caught.set(caught)
    try:
        yield caught
    finally:
        _caught.reset(token)
