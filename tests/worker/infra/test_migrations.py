"""Alembic migrations: upgrade -> downgrade -> upgrade on real PostgreSQL and on SQLite.

The migrations own the schema; these tests check that they build exactly what
worker.infra.tables describes (names of constraints and indexes included), that they can
be undone, and that the command line (alembic.ini) finds the same environment.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from worker.infra import db
from worker.infra.tables import Base

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[3]

TABLES = {"studies", "runs", "results", "trend_config", "deliveries"}
VIEWS = {"current_results", "patient_timeline", "hematoma_expansion"}
UNIQUE_CONSTRAINTS = {
    "studies": {("uq_studies_bucket_prefix_fingerprint", ("bucket", "prefix", "fingerprint"))},
    "runs": {("uq_runs_study_id_model_version", ("study_id", "model_version"))},
    "results": {("uq_results_run_id", ("run_id",))},
    "trend_config": set(),
    "deliveries": {("uq_deliveries_run_id_target", ("run_id", "target"))},
}
INDEXES = {
    "studies": {
        (
            "ix_studies_patient_id_issuer_of_patient_id_study_datetime",
            ("patient_id", "issuer_of_patient_id", "study_datetime"),
        ),
        ("ix_studies_discovered_at", ("discovered_at",)),
        ("ix_studies_study_instance_uid", ("study_instance_uid",)),
        ("ix_studies_study_datetime", ("study_datetime",)),
    },
    "runs": {
        ("ix_runs_state_enqueued_at", ("state", "enqueued_at")),
        ("ix_runs_finished_at", ("finished_at",)),
    },
    "results": {("ix_results_created_at", ("created_at",))},
    "trend_config": set(),
    "deliveries": {
        ("ix_deliveries_state_updated_at", ("state", "updated_at")),
        ("ix_deliveries_result_id", ("result_id",)),
        ("ix_deliveries_replaces_delivery_id", ("replaces_delivery_id",)),
    },
}
FOREIGN_KEYS = {
    "runs": {("fk_runs_study_id_studies", "studies", "CASCADE")},
    "results": {("fk_results_run_id_runs", "runs", "CASCADE")},
    "trend_config": set(),
    "deliveries": {
        ("fk_deliveries_run_id_runs", "runs", "CASCADE"),
        ("fk_deliveries_result_id_results", "results", "CASCADE"),
        ("fk_deliveries_replaces_delivery_id_deliveries", "deliveries", "SET NULL"),
    },
}
CHECKS = {
    "studies": {
        "ck_studies_fingerprint_length",
        "ck_studies_n_objects_nonnegative",
        "ck_studies_total_bytes_nonnegative",
    },
    "runs": {"ck_runs_run_state", "ck_runs_attempts_nonnegative"},
    "results": {"ck_results_volume_ml_nonnegative", "ck_results_n_slices_positive"},
    "trend_config": {"ck_trend_config_single_row", "ck_trend_config_window_positive"},
    "deliveries": {"ck_deliveries_delivery_state", "ck_deliveries_attempts_nonnegative"},
}


def _schema(url: str) -> dict[str, object]:
    engine = db.make_engine(url)
    try:
        insp = inspect(engine)
        tables = set(insp.get_table_names()) - {"alembic_version"}
        return {
            "tables": tables,
            "uniques": {
                t: {(u["name"], tuple(u["column_names"])) for u in insp.get_unique_constraints(t)} for t in tables
            },
            "indexes": {
                t: {(i["name"], tuple(i["column_names"])) for i in insp.get_indexes(t) if not i.get("unique")}
                for t in tables
            },
            "fks": {
                t: {(f["name"], f["referred_table"], f["options"].get("ondelete")) for f in insp.get_foreign_keys(t)}
                for t in tables
            },
            "checks": {t: {c["name"] for c in insp.get_check_constraints(t)} for t in tables},
            "views": set(insp.get_view_names()),
        }
    finally:
        engine.dispose()


def _assert_full_schema(url: str) -> None:
    schema = _schema(url)
    assert schema["tables"] == TABLES
    assert schema["uniques"] == UNIQUE_CONSTRAINTS
    assert schema["indexes"] == INDEXES
    assert schema["fks"] == {**FOREIGN_KEYS, "studies": set()}
    assert schema["checks"] == CHECKS
    assert schema["views"] == VIEWS


def _assert_models_match(url: str) -> None:
    """Autogenerate finds nothing to do: the models and the migrations agree."""
    engine = db.make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def _head() -> str:
    heads = ScriptDirectory.from_config(db.alembic_config()).get_heads()
    assert len(heads) == 1, f"the migrations have several heads: {heads}"
    return heads[0]


def _round_trip(url: str) -> None:
    assert db.current_revision(url) is None
    db.upgrade_to_head(url)
    assert db.current_revision(url) == _head()
    _assert_full_schema(url)
    _assert_models_match(url)

    command.downgrade(db.alembic_config(url), "base")
    assert db.current_revision(url) is None
    schema = _schema(url)
    assert schema["tables"] == set()
    assert schema["views"] == set()

    db.upgrade_to_head(url)
    assert db.current_revision(url) == _head()
    _assert_full_schema(url)


def test_round_trip_on_postgresql(pg_url: str) -> None:
    _round_trip(pg_url)


def test_round_trip_on_sqlite(tmp_path: Path) -> None:
    _round_trip(f"sqlite:///{tmp_path / 'ichvol.db'}")


def test_upgrade_is_idempotent(pg_migrated_url: str) -> None:
    db.upgrade_to_head(pg_migrated_url)
    assert db.current_revision(pg_migrated_url) == _head()
    _assert_full_schema(pg_migrated_url)


def test_revision_files_are_named_rev_slug() -> None:
    versions = REPO_ROOT / "migrations" / "versions"
    files = sorted(p for p in versions.glob("*.py"))
    assert files
    script = ScriptDirectory.from_config(db.alembic_config())
    for path in files:
        match = re.fullmatch(r"([0-9a-f]{12})_([a-z0-9]+(?:_[a-z0-9]+)*)\.py", path.name)
        assert match, path.name
        assert script.get_revision(match.group(1)) is not None, path.name


def test_command_line_uses_alembic_ini_and_x_url(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "alembic",
            "-c",
            str(REPO_ROOT / "alembic.ini"),
            "-x",
            f"url={url}",
            "upgrade",
            "head",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert db.current_revision(url) == _head()


def test_command_line_takes_the_url_from_settings(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'env.db'}"
    env = {**os.environ, "ICHVOL_DATABASE_URL": url}  # the child's environment only
    done = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert db.current_revision(url) == _head()


def test_offline_sql_for_postgresql() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "alembic",
            "-x",
            "url=postgresql+psycopg2://postgres@127.0.0.1:5432/unused",
            "upgrade",
            "head",
            "--sql",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "SET lock_timeout" not in done.stdout  # offline: nothing is executed
    assert "CREATE TABLE studies" in done.stdout
    assert "CONSTRAINT uq_runs_study_id_model_version UNIQUE (study_id, model_version)" in done.stdout
    assert "timings_s JSONB NOT NULL" in done.stdout
