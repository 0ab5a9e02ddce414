"""Hand-made series of results for the trend views: one study version, run and result per scan."""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy.orm import Session, sessionmaker

from worker.infra import db
from worker.infra.tables import Result, Run, RunState, Study

#: The first scan of every hand-made series: 1 March 2025, 08:00 UTC.
T0 = dt.datetime(2025, 3, 1, 8, 0, tzinfo=dt.UTC)

_counter = itertools.count(1)


def at(hours: float) -> dt.datetime:
    """``T0`` plus ``hours``."""
    return T0 + dt.timedelta(hours=hours)


def add_study(
    session: Session,
    *,
    patient_id: str | None,
    issuer: str | None = None,
    when: dt.datetime | None,
    study_instance_uid: str | None = None,
    accession_number: str | None = None,
) -> int:
    """A study version with the identifiers the worker fills in; returns its id."""
    n = next(_counter)
    study = Study(
        bucket="pacs-export",
        prefix=f"exports/S{n:06d}/",
        fingerprint=f"{n:064x}",
        n_objects=30,
        total_bytes=30 * 525_000,
        study_instance_uid=study_instance_uid or f"1.2.826.0.1.3680043.8.498.{n}",
        patient_id=patient_id,
        issuer_of_patient_id=issuer,
        accession_number=accession_number or f"ACC{n:06d}",
        study_date=None if when is None else when.date(),
        study_time=None if when is None else when.time().replace(tzinfo=None),
        study_datetime=when,
    )
    session.add(study)
    session.flush()
    return study.id


def add_result(
    session: Session,
    *,
    study_id: int,
    volume_ml: float,
    abc2_ml: float | None = None,
    model_version: str = "1.0.0",
    measured_at: dt.datetime | None = None,
    state: RunState = RunState.SUCCEEDED,
    error_code: str | None = None,
) -> int:
    """A run of ``model_version`` on the study and, when it succeeded, its result; returns the run id."""
    run = Run(
        study_id=study_id,
        model_name="DR-UNet",
        model_version=model_version,
        model_sha256="a" * 64,
        state=state,
        attempts=1,
        error_code=error_code,
        error_message=None if error_code is None else f"{error_code}: see the run",
        finished_at=measured_at,
    )
    session.add(run)
    session.flush()
    if state is RunState.SUCCEEDED:
        result = Result(
            run_id=run.id,
            series_instance_uid=f"1.2.3.{run.id}",
            volume_ml=volume_ml,
            abc2_ml=volume_ml * 1.1 if abc2_ml is None else abc2_ml,
            n_slices=30,
            pixel_spacing_row_mm=0.45,
            pixel_spacing_col_mm=0.45,
            slab_thickness_mean_mm=5.0,
            timings_s={"total": 10.0},
            result_uri=f"s3://ichvol-results/results/{run.id}/result.json",
        )
        if measured_at is not None:
            result.created_at = measured_at
        session.add(result)
        session.flush()
    return run.id


def add_scan(
    session: Session,
    *,
    patient_id: str | None,
    volume_ml: float,
    hours: float | None,
    issuer: str | None = None,
    study_instance_uid: str | None = None,
    model_version: str = "1.0.0",
) -> int:
    """One measured scan ``hours`` after ``T0`` (None: no usable time); returns the study id."""
    when = None if hours is None else at(hours)
    study_id = add_study(
        session, patient_id=patient_id, issuer=issuer, when=when, study_instance_uid=study_instance_uid
    )
    add_result(
        session,
        study_id=study_id,
        volume_ml=volume_ml,
        model_version=model_version,
        measured_at=None if when is None else when + dt.timedelta(hours=1),
    )
    return study_id


@contextmanager
def session_for(url: str) -> Iterator[Session]:
    """One committed transaction on the database at ``url``."""
    engine = db.make_engine(url)
    try:
        with db.transaction(db.session_factory(engine)) as session:
            yield session
    finally:
        engine.dispose()


@pytest.fixture(params=["postgresql", "sqlite"])
def trend_url(request: pytest.FixtureRequest) -> str:
    """A migrated database: real PostgreSQL, then the embedded SQLite."""
    name = "pg_migrated_url" if request.param == "postgresql" else "sqlite_migrated_url"
    return str(request.getfixturevalue(name))


@pytest.fixture()
def trend_sessions(trend_url: str) -> Iterator[sessionmaker[Session]]:
    engine = db.make_engine(trend_url)
    try:
        yield db.session_factory(engine)
    finally:
        engine.dispose()
