"""Logging: bound identifiers appear, JSON is one object per line, warnings are log lines."""

from __future__ import annotations

import io
import json
import logging
import warnings

from worker.core.logs import collect_warnings, configure_logging, log_context, route_warnings


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


def _pydicom_warning(message: str) -> None:
    """A warning as pydicom raises it: attributed to a module of the installed package."""
    path = "/venv/lib/python3.11/site-packages/pydicom/valuerep.py"
    warnings.warn_explicit(message, UserWarning, path, 440, module="pydicom.valuerep")


def test_warnings_are_one_log_line_at_most_once_per_study_without_quoted_values() -> None:
    stream = io.StringIO()
    configure_logging(level="INFO", stream=stream)
    for _study in range(2):
        with collect_warnings() as caught:
            for _ in range(3):
                _pydicom_warning("Invalid value for VR PN: 'Zyxwvut^Qqqq'.")
        assert [(library, category) for library, category, _ in caught.items] == [("pydicom", "UserWarning")]
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, lines  # once per study
    assert all(line.endswith("worker.warnings: pydicom UserWarning: Invalid value for VR PN: '…'.") for line in lines)
    assert "Zyxwvut" not in stream.getvalue()


def test_outside_a_study_a_warning_is_logged_once_per_process() -> None:
    stream = io.StringIO()
    configure_logging(level="INFO", stream=stream)
    route_warnings()
    for _ in range(3):
        _pydicom_warning("Value 'x' of a test that runs outside a study")
    assert stream.getvalue().count("outside a study") == 1
