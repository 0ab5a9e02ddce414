"""Every ```sql block of README.md and docs/*.md runs on a real PostgreSQL loaded with results.

The documentation cannot rot: a renamed column or view breaks this test. Each block runs
in a transaction of its own that is rolled back (examples may change ``trend_config``). A
block that returns rows must return at least one on the data below, unless it says
``-- may return no rows``; so an example whose filter no longer matches anything is caught too.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from tests.helpers.trends import add_result, add_scan, add_study, session_for
from worker.infra import db
from worker.infra.tables import RunState

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[3]
README = REPO_ROOT / "README.md"
DOCS = sorted((REPO_ROOT / "docs").glob("*.md"))
MAY_BE_EMPTY = "-- may return no rows"
_FENCE = re.compile(r"^```sql[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)


@dataclass(frozen=True)
class SqlBlock:
    path: Path
    line: int
    sql: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO_ROOT)}:{self.line}"


def sql_blocks(path: Path) -> list[SqlBlock]:
    """The ```sql fenced blocks of a Markdown file, with the line each starts on."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    return [
        SqlBlock(path=path, line=text.count("\n", 0, match.start()) + 2, sql=match.group(1))
        for match in _FENCE.finditer(text)
    ]


BLOCKS = [block for path in [README, *DOCS] for block in sql_blocks(path)]


def test_sql_blocks_are_found() -> None:
    """The examples of docs/trends.md are collected (a broken fence pattern would skip them all)."""
    trends = [b for b in BLOCKS if b.path.name == "trends.md"]
    assert len(trends) >= 5
    assert all(b.sql.strip() and not b.sql.lstrip().startswith("```") for b in BLOCKS)


def test_readme_sql_blocks_are_checked() -> None:
    blocks = sql_blocks(README)
    if not blocks:
        pytest.skip("README.md has no ```sql block yet (the trend examples live in docs/trends.md)")
    assert {b.path for b in blocks} == {README}


def load_results(session: Session, now: dt.datetime) -> None:
    """Patients, expansions, model versions and failures around ``now`` (the examples use now())."""

    def scan(patient: str, hours_ago: float | None, volume_ml: float, issuer: str | None = None) -> int:
        study_id = add_study(
            session,
            patient_id=patient,
            issuer=issuer,
            when=None if hours_ago is None else now - dt.timedelta(hours=hours_ago),
        )
        measured = now - dt.timedelta(hours=(hours_ago or 3.0) - 1.0)
        add_result(session, study_id=study_id, volume_ml=volume_ml, measured_at=measured)
        return study_id

    # P0001 (no issuer): baseline 30 h ago, follow-up 6 h ago, measured last night: 8 mL growth
    scan("P0001", 30, 20.0)
    scan("P0001", 6, 28.0)
    scan("P0001", None, 27.0)
    # P0002 of HOSP-A: stable; P0003 of HOSP-A: large growth within 24 h
    scan("P0002", 50, 15.0, "HOSP-A")
    scan("P0002", 26, 15.5, "HOSP-A")
    scan("P0003", 20, 10.0, "HOSP-A")
    scan("P0003", 4, 30.0, "HOSP-A")
    # a few weeks of single scans for the weekly distribution
    for week in range(1, 6):
        scan(f"P1{week:03d}", 24 * 7 * week + 10, 5.0 * week)
    # a study re-measured by a newer model version
    study = scan("P0004", 40, 12.0)
    add_result(session, study_id=study, volume_ml=13.0, model_version="2.0.0", measured_at=now)
    # failures
    for n, code in enumerate(["no_usable_series", "no_usable_series", "only_localizers", "time_limit"]):
        failed = add_study(session, patient_id=f"P9{n:03d}", when=now - dt.timedelta(hours=n + 2))
        add_result(
            session,
            study_id=failed,
            volume_ml=0.0,
            state=RunState.DEAD if code == "time_limit" else RunState.FAILED,
            error_code=code,
            measured_at=now - dt.timedelta(hours=n + 1),
        )
    add_scan(session, patient_id="P0005", volume_ml=3.0, hours=0)


@pytest.fixture()
def loaded_url(pg_migrated_url: str) -> str:
    with session_for(pg_migrated_url) as session:
        load_results(session, dt.datetime.now(dt.UTC))
    return pg_migrated_url


@pytest.mark.parametrize("block", BLOCKS, ids=[b.where for b in BLOCKS])
def test_sql_block_runs(loaded_url: str, block: SqlBlock) -> None:
    engine = db.make_engine(loaded_url)
    try:
        connection = engine.raw_connection()
        try:
            cursor = connection.cursor()
            try:
                cursor.execute(block.sql)  # no parameters: '%' in the SQL stays as it is
            except Exception as error:
                pytest.fail(f"{block.where}: {type(error).__name__}: {error}".strip(), pytrace=False)
            if cursor.description is not None and MAY_BE_EMPTY not in block.sql:
                rows = cursor.fetchall()
                assert rows, f"{block.where}: the example returns no row on the test data"
        finally:
            connection.rollback()
            connection.close()
    finally:
        engine.dispose()
