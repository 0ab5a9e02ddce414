"""Logs carry study and run identifiers, never patient names, birth dates or patient IDs;
the database holds no patient names or birth dates.

A batch of phantoms with distinctive names (Latin, CJK, Cyrillic, SQL and HTML
metacharacters, a name too long for its VR, which makes pydicom quote it in a warning)
and birth dates, some of them broken so that failure paths log too, runs through a real
worker and scheduler at log level DEBUG. Then every line of their logs and every text
cell of the database is searched.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from tests.helpers.faults import PHI_BIRTH_DATES, PHI_NAMES, generate_phantoms
from tests.reliability.conftest import MakeEnv
from worker.infra import db

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.e2e, pytest.mark.timeout(600)]

LONG_NAME = "Qwertzuiopasdfghjklyxcvbnmqwertzuiopasdfghjklyxcvbnmqwertzuiopasdfgh^Overlong"


def _needles() -> list[str]:
    needles = []
    for name in (*PHI_NAMES, LONG_NAME):
        needles.append(name)
        needles.extend(part for part in re.split(r"[\^ ]", name) if len(part) >= 4)
    needles.extend(PHI_BIRTH_DATES)
    return sorted(set(needles))


def _break(folder: Path, how: str) -> None:
    files = sorted(folder.rglob("*.dcm"))
    if how == "truncate":
        files[2].write_bytes(files[2].read_bytes()[:-500])
    elif how == "scout-only":
        for path in files[1:]:
            path.unlink()


def test_no_patient_data_in_logs_or_database(make_env: MakeEnv, tmp_path: Path) -> None:
    env = make_env(log_level="DEBUG")
    studies = generate_phantoms(tmp_path / "phi", 20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the over-long name: that is the point
        studies.update(generate_phantoms(tmp_path / "long", 2, first=500, patient_name=LONG_NAME))
    names = list(studies)
    _break(studies[names[3]], "truncate")
    _break(studies[names[7]], "scout-only")
    prefixes = env.upload(studies)
    env.worker()
    env.scheduler()
    env.wait(prefixes, timeout_s=300)
    report = env.check(prefixes)
    assert report.ok, report.problems
    assert report.failed == 2 and report.succeeded == len(prefixes) - 2

    logs = env.logs()
    # the logs say what happened, by identifier ...
    assert re.search(r"run succeeded: [\d.]+ mL .*run_id=\d+ .*study_id=\d+", logs)
    assert re.search(r"run failed permanently: \w+ .*run_id=\d+", logs)
    assert "DEBUG" in logs  # debug records were written, and searched
    # ... and never who it happened to
    leaked = [needle for needle in _needles() if needle in logs]
    assert not leaked, f"patient data in the logs: {leaked}"
    patient_ids = [f"RELI-{i:05d}" for i in (*range(20), 500, 501)]
    assert not [pid for pid in patient_ids if pid in logs], "patient IDs in the logs"

    # the database keeps identifiers for trends, never names or birth dates
    engine = env.sessions.kw["bind"]
    columns = {t: [c["name"] for c in inspect(engine).get_columns(t)] for t in inspect(engine).get_table_names()}
    assert not [
        f"{t}.{c}" for t, cols in columns.items() for c in cols if ("name" in c and "patient" in c) or "birth" in c
    ], columns
    with db.transaction(env.sessions) as s:
        dump = "\n".join(str(row) for table in columns for row in s.execute(text(f'SELECT * FROM "{table}"')).all())
    assert "RELI-00000" in dump  # the patient ID is stored (trends match on it): the dump is real
    leaked = [needle for needle in _needles() if needle in dump]
    assert not leaked, f"patient data in the database: {leaked}"
