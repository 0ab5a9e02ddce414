"""Logging: bound identifiers appear, JSON is one object per line."""

from __future__ import annotations

import io
import json
import logging

from worker.core.logs import configure_logging, log_context


def test_context_ids_are_attached_in_json() -> None:
    stream = io.StringIO()
    configure_logging(level="INFO", fmt="json", stream=stream)
    with log_context(run_id=7, study_id=3):
        logging.getLogger("worker.test").info("hello %s", "there")
    logging.getLogger("worker.test").info("outside")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "hello there" and first["run_id"] == 7 and first["study_id"] == 3
    assert "run_id" not in second


def test_text_format_appends_context() -> None:
    stream = io.StringIO()
    configure_logging(level="INFO", fmt="text", stream=stream)
    with log_context(run_id=9):
        logging.getLogger("scheduler.x").warning("careful")
    assert stream.getvalue().rstrip().endswith("careful run_id=9")
