"""Reading the trend views: a patient's timeline and expansion, and the expansions of a period.

Every function runs in the caller's session and maps database trouble to the project's
errors (:func:`worker.infra.db.map_db_errors`). Volumes in mL, times aware UTC.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import Select, func, inspect, literal, select, true
from sqlalchemy.orm import Session

from worker.infra import db
from worker.infra.tables import Study
from worker.trends.views import TREND_VIEWS, Definition, Expansion, TimelineRow, expansion_view, timeline_view


def _issuer_key(issuer_of_patient_id: str | None) -> str:
    return issuer_of_patient_id or ""


def trend_views_missing(session: Session) -> list[str]:
    """The trend views (and ``trend_config``) the database lacks: empty when migrated."""
    with db.map_db_errors():
        insp = inspect(session.connection())
        present = set(insp.get_view_names()) | set(insp.get_table_names())
    return [name for name in ("trend_config", *TREND_VIEWS) if name not in present]


def patient_issuers(session: Session, *, patient_id: str) -> list[str]:
    """The issuer keys ('' for none) under which ``patient_id`` has measured scans, sorted."""
    v = timeline_view.c
    with db.map_db_errors():
        keys = session.execute(
            select(v.issuer_key).where(v.patient_id == patient_id).distinct().order_by(v.issuer_key)
        ).scalars()
        return [str(key) for key in keys]


def patient_timeline(session: Session, *, patient_id: str, issuer_of_patient_id: str | None) -> list[TimelineRow]:
    """The patient's scans in time order (scans without a usable time last); empty if unknown.

    ``issuer_of_patient_id`` None and '' are the same issuer (none).
    """
    v = timeline_view.c
    stmt = (
        select(timeline_view)
        .where(v.patient_id == patient_id, v.issuer_key == _issuer_key(issuer_of_patient_id))
        .order_by(v.scan_number)
    )
    with db.map_db_errors():
        rows = session.execute(stmt).mappings().all()
    return [
        TimelineRow(
            scan_number=int(row["scan_number"]),
            study_id=int(row["study_id"]),
            study_instance_uid=row["study_instance_uid"],
            accession_number=row["accession_number"],
            study_datetime=row["study_datetime"],
            hours_since_first=row["hours_since_first"],
            volume_ml=float(row["volume_ml"]),
            abc2_ml=float(row["abc2_ml"]),
            model_version=str(row["model_version"]),
            is_baseline=bool(row["is_baseline"]),
            baseline_volume_ml=row["baseline_volume_ml"],
            change_from_previous_ml=row["change_from_previous_ml"],
            change_from_previous_pct=row["change_from_previous_pct"],
            change_from_baseline_ml=row["change_from_baseline_ml"],
            change_from_baseline_pct=row["change_from_baseline_pct"],
            ratio_to_baseline=row["ratio_to_baseline"],
            window_hours=float(row["window_hours"]),
            in_expansion_window=bool(row["in_expansion_window"]),
            meets_6ml_or_33pct=bool(row["meets_6ml_or_33pct"]),
            meets_12_5ml_or_1_4x=bool(row["meets_12_5ml_or_1_4x"]),
        )
        for row in rows
    ]


def _expansion(row: Any) -> Expansion:
    return Expansion(
        issuer_key=str(row["issuer_key"]),
        patient_id=str(row["patient_id"]),
        issuer_of_patient_id=row["issuer_of_patient_id"] or None,
        baseline_study_id=int(row["baseline_study_id"]),
        baseline_datetime=row["baseline_datetime"],
        baseline_volume_ml=float(row["baseline_volume_ml"]),
        window_hours=float(row["window_hours"]),
        n_scans=int(row["n_scans"]),
        n_scans_without_time=int(row["n_scans_without_time"]),
        n_followups_in_window=int(row["n_followups_in_window"]),
        max_followup_volume_ml=row["max_followup_volume_ml"],
        max_growth_ml=row["max_growth_ml"],
        max_growth_pct=row["max_growth_pct"],
        max_ratio_to_baseline=row["max_ratio_to_baseline"],
        expansion_6ml_or_33pct=bool(row["expansion_6ml_or_33pct"]),
        expansion_6ml_or_33pct_first_at=row["expansion_6ml_or_33pct_first_at"],
        expansion_12_5ml_or_1_4x=bool(row["expansion_12_5ml_or_1_4x"]),
        expansion_12_5ml_or_1_4x_first_at=row["expansion_12_5ml_or_1_4x_first_at"],
    )


def patient_expansion(session: Session, *, patient_id: str, issuer_of_patient_id: str | None) -> Expansion | None:
    """The patient's row of ``hematoma_expansion``; None without a scan with a usable time."""
    v = expansion_view.c
    stmt = select(expansion_view).where(v.patient_id == patient_id, v.issuer_key == _issuer_key(issuer_of_patient_id))
    with db.map_db_errors():
        row = session.execute(stmt).mappings().first()
    return None if row is None else _expansion(row)


def expansions_statement(
    *, dialect: str, since: dt.datetime, until: dt.datetime | None, definition: Definition
) -> Select[Any]:
    """The query behind :func:`expansions_since` for ``dialect`` (``postgresql`` or ``sqlite``).

    PostgreSQL: the period's patients come from ``ix_studies_study_datetime`` and the
    view is evaluated per patient (``LATERAL``; ``OFFSET 0`` keeps the planner from
    flattening it, so the patient condition reaches the index on ``studies``). SQLite
    has no ``LATERAL``: the view is filtered whole (fine at embedded scale).
    """
    for name, value in (("since", since), ("until", until)):
        if value is not None and (value.tzinfo is None or value.utcoffset() is None):
            raise ValueError(f"{name} must be an aware datetime, got {value!r}")
    source: Any
    if dialect == "postgresql":
        studies = Study.__table__.c
        period = [studies.study_datetime >= since]
        if until is not None:
            period.append(studies.study_datetime < until)
        candidates = (
            select(
                func.coalesce(studies.issuer_of_patient_id, literal("")).label("issuer_key"),
                studies.patient_id,
            )
            .where(studies.patient_id.is_not(None), studies.patient_id != "", *period)
            .distinct()
            .subquery("period_patients")
        )
        v = expansion_view.c
        source = (
            select(expansion_view)
            .where(v.issuer_key == candidates.c.issuer_key, v.patient_id == candidates.c.patient_id)
            .offset(0)
            .lateral("e")
        )
        base = select(source).select_from(candidates).join(source, true())
    else:
        source = expansion_view
        base = select(expansion_view)
    c = source.c
    first_6 = c.expansion_6ml_or_33pct_first_at
    first_12 = c.expansion_12_5ml_or_1_4x_first_at

    def in_period(column: Any) -> Any:
        return (column >= since) if until is None else ((column >= since) & (column < until))

    if definition is Definition.ML6_OR_PCT33:
        condition, first = in_period(first_6), first_6
    elif definition is Definition.ML12_5_OR_X1_4:
        condition, first = in_period(first_12), first_12
    else:
        condition = in_period(first_6) | in_period(first_12)
        first = func.coalesce(first_6, first_12)
    return base.where(condition).order_by(first, c.issuer_key, c.patient_id)


def expansions_since(
    session: Session,
    *,
    since: dt.datetime,
    until: dt.datetime | None = None,
    definition: Definition = Definition.ANY,
) -> list[Expansion]:
    """Patients whose expansion (by ``definition``) was first seen on a follow-up acquired in ``[since, until)``.

    "First seen": the earliest follow-up within the window that meets the definition, so
    a patient is listed once, on the night the expansion appeared. ``since``/``until``
    are aware datetimes compared with ``studies.study_datetime`` (UTC). Ordered by that
    first follow-up's time (for ``any``: the 6 mL / 33 % one, which never comes later),
    then patient.
    """
    stmt = expansions_statement(
        dialect=session.get_bind().dialect.name, since=since, until=until, definition=definition
    )
    with db.map_db_errors():
        rows = session.execute(stmt).mappings().all()
    return [_expansion(row) for row in rows]
