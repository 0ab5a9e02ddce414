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
first scan with a usable time. This module describes the views and the values read from
them; :mod:`worker.trends.queries` reads them, :mod:`worker.trends.formatting` prints
them, :mod:`worker.trends.plot` draws a timeline, :mod:`worker.infra.trend_config` keeps
``trend_config`` in step with :class:`~worker.core.settings.Settings`, and
:mod:`worker.cli.trends` is ``ichvol trends``. Research use only, not for clinical use.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy import BigInteger, Boolean, Column, Float, Integer, MetaData, Table, Text

from worker.infra.tables import UtcDateTime

#: The views the trend migration creates, in creation order.
TREND_VIEWS = ("current_results", "patient_timeline", "hematoma_expansion")


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
