"""Hematoma volume trends: per-patient timelines and expansion flags, read from SQL views.

The views (migration ``bdd4386a76ba``, documented column by column in docs/trends.md):

* ``current_results`` -- one row per study version with its current result: the result
  of the pinned model version (``trend_config.pinned_model_version``) or, when nothing
  is pinned, the most recent result of the study version (``results.created_at``, then
  ``results.id``). Only succeeded runs.
* ``patient_timeline`` -- one row per scan of a patient, in time order. A patient is
  ``(coalesce(IssuerOfPatientID, ''), PatientID)``; studies without a PatientID are left
  out. Several versions of one StudyInstanceUID (re-exports) count once: the newest.
  Times are ``studies.study_datetime`` (UTC as stored by the worker). Scans without a
  usable time are listed last with NULL hours and changes and never serve as baseline
  or follow-up. The baseline is the earliest scan with a usable time; ties go to the
  lower ``study_id``.
* ``hematoma_expansion`` -- one row per patient with a baseline: the follow-ups within
  the window (``0 < hours_since_first <= trend_config.expansion_window_hours``) and a flag
  per definition: growth >= 6 mL or >= 33 %, and growth >= 12.5 mL or ratio >= 1.4. The
  relative criteria need a baseline above 0 mL; comparisons allow 1e-6 mL of
  floating-point error so that exactly 6 mL or exactly 33 % counts.

Volumes are in mL, times are aware UTC datetimes, hours are hours since the patient's
first scan with a usable time. This module reads the views, keeps ``trend_config`` in
step with :class:`~worker.core.settings.Settings`, and implements ``ichvol trends``.
Research use only, not for clinical use.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Integer,
    MetaData,
    Select,
    Table,
    Text,
    func,
    inspect,
    literal,
    select,
    text,
    true,
    update,
)
from sqlalchemy.orm import Session

from worker.core.notices import DISCLAIMER
from worker.core.settings import Settings
from worker.infra import db

#: Follow-up window of the expansion definitions when ``trend_config`` says nothing (hours).
from worker.infra.tables import (  # noqa: F401
    DEFAULT_WINDOW_HOURS,
    STUDY_DATETIME_INDEX,
    Base,
    Study,
    TrendConfig,
    UtcDateTime,
)

#: The views the trend migration creates, in creation order.
TREND_VIEWS = ("current_results", "patient_timeline", "hematoma_expansion")
#: The largest window ``--set-window`` accepts (hours): a year; beyond that it is a typo.
MAX_WINDOW_HOURS = 24.0 * 366


class Definition(StrEnum):
    """Which hematoma-expansion definition a query asks for."""

    ML6_OR_PCT33 = "6ml_or_33pct"  # growth >= 6 mL or >= 33 % of the baseline volume
    ML12_5_OR_X1_4 = "12_5ml_or_1_4x"  # growth >= 12.5 mL or volume >= 1.4 x baseline
    ANY = "any"


# --------------------------------------------------------------------------------------------
# schema objects of the trend migration


# The views, typed for reading (a MetaData of their own: they are not tables to create).
_VIEWS = MetaData()

current_results_view = Table(
    "current_results",
    _VIEWS,
    Column("study_id", BigInteger),
    Column("run_id", BigInteger),
    Column("result_id", BigInteger),
    Column("bucket", Text),
    Column("prefix", Text),
    Column("study_instance_uid", Text),
    Column("patient_id", Text),
    Column("issuer_of_patient_id", Text),
    Column("accession_number", Text),
    Column("study_date", Text),
    Column("study_time", Text),
    Column("study_datetime", UtcDateTime()),
    Column("model_name", Text),
    Column("model_version", Text),
    Column("series_instance_uid", Text),
    Column("volume_ml", Float),
    Column("abc2_ml", Float),
    Column("n_slices", Integer),
    Column("slab_thickness_mean_mm", Float),
    Column("result_uri", Text),
    Column("overlay_uri", Text),
    Column("measured_at", UtcDateTime()),
)

timeline_view = Table(
    "patient_timeline",
    _VIEWS,
    Column("issuer_key", Text),
    Column("patient_id", Text),
    Column("issuer_of_patient_id", Text),
    Column("scan_number", BigInteger),
    Column("study_id", BigInteger),
    Column("study_instance_uid", Text),
    Column("accession_number", Text),
    Column("study_datetime", UtcDateTime()),
    Column("hours_since_first", Float),
    Column("volume_ml", Float),
    Column("abc2_ml", Float),
    Column("model_version", Text),
    Column("result_id", BigInteger),
    Column("measured_at", UtcDateTime()),
    Column("baseline_study_id", BigInteger),
    Column("is_baseline", Boolean),
    Column("baseline_volume_ml", Float),
    Column("previous_study_id", BigInteger),
    Column("change_from_previous_ml", Float),
    Column("change_from_previous_pct", Float),
    Column("change_from_baseline_ml", Float),
    Column("change_from_baseline_pct", Float),
    Column("ratio_to_baseline", Float),
    Column("window_hours", Float),
    Column("in_expansion_window", Boolean),
    Column("meets_6ml_or_33pct", Boolean),
    Column("meets_12_5ml_or_1_4x", Boolean),
)

expansion_view = Table(
    "hematoma_expansion",
    _VIEWS,
    Column("issuer_key", Text),
    Column("patient_id", Text),
    Column("issuer_of_patient_id", Text),
    Column("baseline_study_id", BigInteger),
    Column("baseline_study_instance_uid", Text),
    Column("baseline_accession_number", Text),
    Column("baseline_datetime", UtcDateTime()),
    Column("baseline_volume_ml", Float),
    Column("window_hours", Float),
    Column("n_scans", BigInteger),
    Column("n_scans_without_time", BigInteger),
    Column("n_followups_in_window", BigInteger),
    Column("max_followup_volume_ml", Float),
    Column("max_growth_ml", Float),
    Column("max_growth_pct", Float),
    Column("max_ratio_to_baseline", Float),
    Column("expansion_6ml_or_33pct", Boolean),
    Column("expansion_6ml_or_33pct_first_at", UtcDateTime()),
    Column("expansion_12_5ml_or_1_4x", Boolean),
    Column("expansion_12_5ml_or_1_4x_first_at", UtcDateTime()),
)


# --------------------------------------------------------------------------------------------
# values


@dataclass(frozen=True)
class TrendSettings:
    """What the views are configured with (the ``trend_config`` row)."""

    pinned_model_version: str | None
    expansion_window_hours: float


@dataclass(frozen=True)
class TimelineRow:
    """One scan of a patient (a row of ``patient_timeline``).

    Volumes in mL; ``study_datetime`` aware UTC (None: no usable time); hours since the
    patient's first scan with a usable time. Changes are None where undefined: no usable
    time, no previous scan, or a 0 mL reference for percentages and ratios.
    """

    scan_number: int
    study_id: int
    study_instance_uid: str | None
    accession_number: str | None
    study_datetime: dt.datetime | None
    hours_since_first: float | None
    volume_ml: float
    abc2_ml: float
    model_version: str
    is_baseline: bool
    baseline_volume_ml: float | None
    change_from_previous_ml: float | None
    change_from_previous_pct: float | None
    change_from_baseline_ml: float | None
    change_from_baseline_pct: float | None
    ratio_to_baseline: float | None
    window_hours: float
    in_expansion_window: bool
    meets_6ml_or_33pct: bool
    meets_12_5ml_or_1_4x: bool


@dataclass(frozen=True)
class Expansion:
    """One patient's baseline and follow-ups (a row of ``hematoma_expansion``). mL, hours, UTC."""

    issuer_key: str
    patient_id: str
    issuer_of_patient_id: str | None
    baseline_study_id: int
    baseline_datetime: dt.datetime
    baseline_volume_ml: float
    window_hours: float
    n_scans: int
    n_scans_without_time: int
    n_followups_in_window: int
    max_followup_volume_ml: float | None
    max_growth_ml: float | None
    max_growth_pct: float | None
    max_ratio_to_baseline: float | None
    expansion_6ml_or_33pct: bool
    expansion_6ml_or_33pct_first_at: dt.datetime | None
    expansion_12_5ml_or_1_4x: bool
    expansion_12_5ml_or_1_4x_first_at: dt.datetime | None


@dataclass(frozen=True)
class Threshold:
    """A horizontal line of the trend plot: the follow-up volume (mL) that meets a criterion."""

    label: str
    volume_ml: float


def expansion_thresholds(baseline_volume_ml: float) -> list[Threshold]:
    """The follow-up volumes (mL) at which each expansion criterion is met, lowest first.

    Absolute criteria: baseline + 6 mL and baseline + 12.5 mL. Relative ones (baseline x
    1.33 and x 1.4) only for a baseline above 0 mL, as in the views.
    """
    if not math.isfinite(baseline_volume_ml) or baseline_volume_ml < 0:
        raise ValueError(f"baseline volume must be a finite number of mL >= 0, got {baseline_volume_ml!r}")
    lines = [
        Threshold("baseline + 6 mL", baseline_volume_ml + 6.0),
        Threshold("baseline + 12.5 mL", baseline_volume_ml + 12.5),
    ]
    if baseline_volume_ml > 0:
        lines += [
            Threshold("baseline x 1.33", baseline_volume_ml * 1.33),
            Threshold("baseline x 1.4", baseline_volume_ml * 1.4),
        ]
    return sorted(lines, key=lambda line: line.volume_ml)


# --------------------------------------------------------------------------------------------
# configuration


def read_trend_config(session: Session) -> TrendSettings:
    """The ``trend_config`` row (the defaults if the row is missing)."""
    with db.map_db_errors():
        row = session.execute(
            select(TrendConfig.pinned_model_version, TrendConfig.expansion_window_hours).where(TrendConfig.id == 1)
        ).first()
    if row is None:
        return TrendSettings(pinned_model_version=None, expansion_window_hours=DEFAULT_WINDOW_HOURS)
    return TrendSettings(pinned_model_version=row[0], expansion_window_hours=float(row[1]))


def _write_config(session: Session, values: dict[str, Any]) -> TrendSettings:
    with db.map_db_errors():
        changed = db.rowcount(
            session.execute(update(TrendConfig).where(TrendConfig.id == 1).values(**values, updated_at=func.now()))
        )
        if not changed:
            session.add(TrendConfig(id=1, **values))
        session.flush()
    return read_trend_config(session)


def sync_trend_config(session: Session, settings: Settings) -> TrendSettings:
    """Copy ``ICHVOL_PINNED_MODEL_VERSION`` into ``trend_config`` (the scheduler calls this at start).

    The settings are the source of truth for the pin: an empty setting removes it. The
    window is left as it is (``ichvol trends --set-window``). Runs in the caller's
    transaction; returns the configuration now in force.
    """
    return _write_config(session, {"pinned_model_version": settings.pinned_model_version})


def set_expansion_window(session: Session, *, hours: float) -> TrendSettings:
    """Set the follow-up window of the expansion definitions (hours after the baseline scan)."""
    if not math.isfinite(hours) or not 0 < hours <= MAX_WINDOW_HOURS:
        raise ValueError(f"the expansion window must be more than 0 and at most {MAX_WINDOW_HOURS:g} hours")
    return _write_config(session, {"expansion_window_hours": float(hours)})


# --------------------------------------------------------------------------------------------
# queries


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


# --------------------------------------------------------------------------------------------
# text output


def _fmt(value: float | None, spec: str = ".1f", *, signed: bool = False) -> str:
    if value is None:
        return "-"
    return format(value, ("+" if signed else "") + spec)


def _fmt_time(value: dt.datetime | None) -> str:
    return "-" if value is None else value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], *, align: str) -> str:
    """A plain-text table; ``align`` has one letter per column: ``l`` left, ``r`` right."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        padded = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(cells, widths, align, strict=True)]
        return "  ".join(padded).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _flags(row: TimelineRow) -> str:
    if row.is_baseline:
        return "baseline"
    if row.study_datetime is None:
        return "no usable time"
    marks = []
    if row.meets_6ml_or_33pct:
        marks.append("6mL/33%")
    if row.meets_12_5ml_or_1_4x:
        marks.append("12.5mL/1.4x")
    if not row.in_expansion_window:
        marks.append("outside window" if (row.hours_since_first or 0) > 0 else "same time as baseline")
    return ", ".join(marks) or "-"


def format_timeline(rows: Sequence[TimelineRow], *, expansion: Expansion | None, config: TrendSettings) -> str:
    """The timeline as a text table, a summary per definition, and the disclaimer."""
    table = _table(
        [
            "#",
            "date/time (UTC)",
            "hours",
            "volume mL",
            "ABC/2 mL",
            "d prev mL",
            "d prev %",
            "d base mL",
            "d base %",
            "flags",
        ],
        [
            [
                str(r.scan_number),
                _fmt_time(r.study_datetime),
                _fmt(r.hours_since_first),
                _fmt(r.volume_ml, ".2f"),
                _fmt(r.abc2_ml, ".2f"),
                _fmt(r.change_from_previous_ml, ".2f", signed=True),
                _fmt(r.change_from_previous_pct, ".1f", signed=True),
                _fmt(r.change_from_baseline_ml, ".2f", signed=True),
                _fmt(r.change_from_baseline_pct, ".1f", signed=True),
                _flags(r),
            ]
            for r in rows
        ],
        align="rlrrrrrrrl",
    )
    pinned = config.pinned_model_version
    lines = [
        table,
        "",
        f"model version: {'pinned ' + pinned if pinned else 'latest result per study'}; "
        f"expansion window: {config.expansion_window_hours:g} h after the baseline scan",
    ]
    if expansion is None:
        lines.append("no scan has a usable acquisition or study time: expansion cannot be assessed")
    else:
        for name, met, first in (
            ("growth >= 6 mL or >= 33 %", expansion.expansion_6ml_or_33pct, expansion.expansion_6ml_or_33pct_first_at),
            (
                "growth >= 12.5 mL or ratio >= 1.4",
                expansion.expansion_12_5ml_or_1_4x,
                expansion.expansion_12_5ml_or_1_4x_first_at,
            ),
        ):
            verdict = f"EXPANSION (first on the scan of {_fmt_time(first)})" if met else "no expansion"
            lines.append(f"{name}: {verdict}; {expansion.n_followups_in_window} follow-up(s) in the window")
    lines.append(DISCLAIMER)
    return "\n".join(lines)


def format_expansions(expansions: Sequence[Expansion], *, definition: Definition, since: dt.datetime) -> str:
    """The expansion list as a text table, a count line and the disclaimer."""
    if not expansions:
        body = f"no patient meets {definition.value} on a follow-up acquired since {_fmt_time(since)} (UTC)"
    else:
        table = _table(
            [
                "patient ID",
                "issuer",
                "baseline (UTC)",
                "base mL",
                "max growth mL",
                "max growth %",
                "max ratio",
                "6mL/33% first",
                "12.5mL/1.4x first",
            ],
            [
                [
                    e.patient_id,
                    e.issuer_of_patient_id or "-",
                    _fmt_time(e.baseline_datetime),
                    _fmt(e.baseline_volume_ml, ".2f"),
                    _fmt(e.max_growth_ml, ".2f", signed=True),
                    _fmt(e.max_growth_pct, ".1f", signed=True),
                    _fmt(e.max_ratio_to_baseline, ".2f"),
                    _fmt_time(e.expansion_6ml_or_33pct_first_at),
                    _fmt_time(e.expansion_12_5ml_or_1_4x_first_at),
                ]
                for e in expansions
            ],
            align="lllrrrrll",
        )
        body = f"{table}\n\n{len(expansions)} patient(s) meet {definition.value} since {_fmt_time(since)} (UTC)"
    return f"{body}\n{DISCLAIMER}"


# --------------------------------------------------------------------------------------------
# command line


def add_trends_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``ichvol trends``."""
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--patient", metavar="ID", help="print this PatientID's timeline and plot it")
    what.add_argument("--expansions", action="store_true", help="list patients whose expansion appeared since --since")
    what.add_argument(
        "--set-window", type=float, metavar="HOURS", help="set the follow-up window of the expansion views"
    )
    parser.add_argument(
        "--issuer",
        metavar="ISSUER",
        help="IssuerOfPatientID of --patient ('' for none); needed when the ID exists under several issuers",
    )
    parser.add_argument(
        "--plot", type=Path, default=Path("ichvol-trend.png"), help="PNG of the timeline (default ./ichvol-trend.png)"
    )
    parser.add_argument("--no-plot", action="store_true", help="print the timeline only")
    parser.add_argument(
        "--since", metavar="DATE", help="with --expansions: YYYY-MM-DD or an ISO date-time (UTC if no offset)"
    )
    parser.add_argument("--until", metavar="DATE", help="with --expansions: end of the period, exclusive")
    parser.add_argument(
        "--definition",
        choices=[d.value for d in Definition],
        default=Definition.ANY.value,
        help="which expansion definition (default: any)",
    )
    parser.add_argument("--database-url", dest="database_url", help="override ICHVOL_DATABASE_URL")


def parse_since(value: str) -> dt.datetime:
    """``YYYY-MM-DD`` (midnight UTC) or an ISO 8601 date-time (UTC when it has no offset)."""
    try:
        parsed = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"{value!r} is not a date (YYYY-MM-DD) or an ISO date-time") from None
    return parsed.replace(tzinfo=dt.UTC) if parsed.tzinfo is None else parsed.astimezone(dt.UTC)


class _UsageError(Exception):
    """Bad input to ``ichvol trends``: printed as one line, exit code 2."""


def run_trends_command(args: argparse.Namespace, settings: Settings) -> int:
    """``ichvol trends``: 0 on success, 2 with one line on stderr for unusable input."""
    engine = db.make_engine(settings.database_url)
    try:
        sessions = db.session_factory(engine)
        with db.transaction(sessions) as session:
            missing = trend_views_missing(session)
            if missing:
                raise _UsageError(
                    f"the database has no trend views ({', '.join(missing)} missing): "
                    "migrate it with `alembic upgrade head`"
                )
            if not args.expansions and (args.since or args.until):
                raise _UsageError("--since and --until go with --expansions")
            if args.set_window is not None:
                try:
                    config = set_expansion_window(session, hours=args.set_window)
                except ValueError as error:
                    raise _UsageError(f"--set-window: {error}") from None
                print(f"expansion window set to {config.expansion_window_hours:g} h after the baseline scan")
                return 0
            if session.get_bind().dialect.name == "postgresql":
                # These plans cost just above jit_above_cost; compiling them takes longer
                # (~70 ms on one night of the benchmark) than the query saves.
                session.execute(text("SET LOCAL jit = off"))
            if args.expansions:
                return _print_expansions(session, args)
            return _print_patient(session, args)
    except _UsageError as error:
        print(f"ichvol: {error}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()


def _print_expansions(session: Session, args: argparse.Namespace) -> int:
    if not args.since:
        raise _UsageError("--expansions needs --since DATE (YYYY-MM-DD)")
    try:
        since = parse_since(args.since)
        until = parse_since(args.until) if args.until else None
    except ValueError as error:
        raise _UsageError(str(error)) from None
    if until is not None and until <= since:
        raise _UsageError("--until must be after --since")
    definition = Definition(args.definition)
    found = expansions_since(session, since=since, until=until, definition=definition)
    print(format_expansions(found, definition=definition, since=since))
    return 0


def _print_patient(session: Session, args: argparse.Namespace) -> int:
    patient_id = str(args.patient).strip()
    if not patient_id:
        raise _UsageError("--patient needs a non-empty PatientID")
    issuers = patient_issuers(session, patient_id=patient_id)
    if args.issuer is not None:
        issuer_key = args.issuer.strip()
        if issuer_key not in issuers:
            raise _UsageError(f"no measured study for PatientID {patient_id!r} with issuer {issuer_key!r}")
    elif not issuers:
        raise _UsageError(f"no measured study for PatientID {patient_id!r}")
    elif len(issuers) > 1:
        shown = ", ".join(repr(key) if key else "(none)" for key in issuers)
        raise _UsageError(f"PatientID {patient_id!r} exists under several issuers ({shown}): pass --issuer")
    else:
        issuer_key = issuers[0]
    rows = patient_timeline(session, patient_id=patient_id, issuer_of_patient_id=issuer_key)
    expansion = patient_expansion(session, patient_id=patient_id, issuer_of_patient_id=issuer_key)
    config = read_trend_config(session)
    print(format_timeline(rows, expansion=expansion, config=config))
    if args.no_plot:
        return 0
    if expansion is None:
        print("no plot: no scan has a usable time")
        return 0
    from worker.trends.plot import plot_timeline

    try:
        path = plot_timeline(rows=rows, window_hours=expansion.window_hours, out_path=args.plot)
    except OSError as error:
        raise _UsageError(f"cannot write the plot to {args.plot}: {error.strerror or error}") from None
    print(f"plot: {path}")
    return 0
