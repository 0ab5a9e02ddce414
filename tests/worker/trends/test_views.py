"""The trend views on hand-made series of results: real PostgreSQL, and the embedded SQLite.

Every expansion case is a patient of its own; the flags must be exactly right in each.
"""

from __future__ import annotations

import datetime as dt
import re

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from tests.helpers.trends import add_result, add_scan, add_study, at, session_for, trend_sessions, trend_url
from worker.core.settings import Settings
from worker.infra import db
from worker.infra.tables import RunState
from worker.infra.trend_config import read_trend_config, set_expansion_window, sync_trend_config
from worker.trends.queries import expansions_since, expansions_statement, patient_expansion, patient_timeline
from worker.trends.views import Definition, current_results_view

pytestmark = pytest.mark.integration

__all__ = ["trend_sessions", "trend_url"]  # fixtures, used by name

# patient -> [(hours after T0 or None, volume mL)], in insertion (study id) order,
# and the expected (6 mL or 33 %, 12.5 mL or 1.4x) flags.
SERIES: dict[str, tuple[list[tuple[float | None, float]], tuple[bool, bool]]] = {
    "exact-6ml": ([(0, 30.0), (24, 36.0)], (True, False)),
    "under-6ml": ([(0, 30.0), (24, 35.99)], (False, False)),
    "exact-33pct": ([(0, 15.0), (24, 19.95)], (True, False)),  # 4.95 mL: only the relative criterion
    "under-33pct": ([(0, 15.0), (24, 19.94)], (False, False)),
    "exact-33pct-of-30": ([(0, 30.0), (24, 39.9)], (True, False)),
    "exact-12.5ml": ([(0, 40.0), (24, 52.5)], (True, True)),  # ratio 1.31: only the absolute criterion
    "under-12.5ml": ([(0, 40.0), (24, 52.49)], (True, False)),
    "exact-1.4x": ([(0, 2.1), (24, 2.94)], (True, True)),  # 0.84 mL: only the relative criteria
    "under-1.4x": ([(0, 2.1), (24, 2.93)], (True, False)),
    "exact-1.4x-of-25": ([(0, 25.0), (24, 35.0)], (True, True)),
    "decrease": ([(0, 30.0), (24, 20.0)], (False, False)),
    "single": ([(0, 12.0)], (False, False)),
    "same-time": ([(0, 10.0), (0, 30.0)], (False, False)),  # the second is no follow-up
    "missing-times": ([(None, 5.0), (0, 20.0), (24, 27.0)], (True, False)),
    "untimed-growth": ([(0, 10.0), (None, 50.0)], (False, False)),
    "window-edge": ([(0, 30.0), (72, 37.0)], (True, False)),
    "past-window": ([(0, 30.0), (72 + 1 / 60, 37.0)], (False, False)),
    "before-baseline-untimed": ([(None, 40.0), (5, 10.0)], (False, False)),
    "zero-baseline": ([(0, 0.0), (24, 6.0)], (True, False)),
    "zero-baseline-small": ([(0, 0.0), (24, 5.99)], (False, False)),
    "later-growth": ([(0, 20.0), (12, 22.0), (48, 27.0)], (True, False)),
}


def _load_series(session: Session) -> dict[str, list[int]]:
    ids: dict[str, list[int]] = {}
    for patient, (scans, _flags) in SERIES.items():
        ids[patient] = [add_scan(session, patient_id=patient, volume_ml=v, hours=h) for h, v in scans]
    return ids


@pytest.fixture()
def loaded(trend_sessions: sessionmaker[Session]) -> dict[str, list[int]]:
    with db.transaction(trend_sessions) as session:
        return _load_series(session)


@pytest.mark.parametrize("patient", sorted(SERIES))
def test_expansion_flags_are_exact(
    trend_sessions: sessionmaker[Session], loaded: dict[str, list[int]], patient: str
) -> None:
    expected = SERIES[patient][1]
    with db.transaction(trend_sessions) as session:
        found = patient_expansion(session, patient_id=patient, issuer_of_patient_id=None)
        rows = patient_timeline(session, patient_id=patient, issuer_of_patient_id=None)
    assert found is not None
    assert (found.expansion_6ml_or_33pct, found.expansion_12_5ml_or_1_4x) == expected
    # the timeline's per-scan flags agree with the per-patient ones
    assert any(r.meets_6ml_or_33pct for r in rows) == expected[0]
    assert any(r.meets_12_5ml_or_1_4x for r in rows) == expected[1]
    assert (found.expansion_6ml_or_33pct_first_at is not None) == expected[0]
    assert (found.expansion_12_5ml_or_1_4x_first_at is not None) == expected[1]


def test_exact_6ml_timeline_values(trend_sessions: sessionmaker[Session], loaded: dict[str, list[int]]) -> None:
    with db.transaction(trend_sessions) as session:
        base, follow = patient_timeline(session, patient_id="exact-6ml", issuer_of_patient_id=None)
        expansion = patient_expansion(session, patient_id="exact-6ml", issuer_of_patient_id=None)
    assert base.is_baseline and not follow.is_baseline
    assert base.hours_since_first == 0.0 and follow.hours_since_first == 24.0
    assert base.change_from_previous_ml is None and base.change_from_baseline_ml == 0.0
    assert follow.change_from_previous_ml == pytest.approx(6.0)
    assert follow.change_from_baseline_pct == pytest.approx(20.0)
    assert follow.ratio_to_baseline == pytest.approx(1.2)
    assert follow.in_expansion_window and not base.in_expansion_window
    assert expansion is not None
    assert expansion.baseline_study_id == loaded["exact-6ml"][0]
    assert expansion.baseline_datetime == at(0)
    assert expansion.n_followups_in_window == 1
    assert expansion.max_growth_ml == pytest.approx(6.0)
    assert expansion.expansion_6ml_or_33pct_first_at == at(24)


def test_decrease(trend_sessions: sessionmaker[Session], loaded: dict[str, list[int]]) -> None:
    with db.transaction(trend_sessions) as session:
        _base, follow = patient_timeline(session, patient_id="decrease", issuer_of_patient_id=None)
    assert follow.change_from_baseline_ml == pytest.approx(-10.0)
    assert follow.change_from_baseline_pct == pytest.approx(-100.0 / 3)
    assert follow.change_from_previous_pct == pytest.approx(-100.0 / 3)


def test_single_scan(trend_sessions: sessionmaker[Session], loaded: dict[str, list[int]]) -> None:
    with db.transaction(trend_sessions) as session:
        (only,) = patient_timeline(session, patient_id="single", issuer_of_patient_id=None)
        expansion = patient_expansion(session, patient_id="single", issuer_of_patient_id=None)
    assert only.is_baseline and only.hours_since_first == 0.0 and only.change_from_previous_ml is None
    assert expansion is not None
    assert (expansion.n_scans, expansion.n_followups_in_window) == (1, 0)
    assert expansion.max_growth_ml is None


def test_two_scans_at_the_same_time(trend_sessions: sessionmaker[Session], loaded: dict[str, list[int]]) -> None:
    first_id, second_id = loaded["same-time"]
    with db.transaction(trend_sessions) as session:
        rows = patient_timeline(session, patient_id="same-time", issuer_of_patient_id=None)
        expansion = patient_expansion(session, patient_id="same-time", issuer_of_patient_id=None)
    assert [r.study_id for r in rows] == [first_id, second_id]  # tie broken by study id
    assert rows[0].is_baseline and not rows[1].is_baseline
    assert rows[1].hours_since_first == 0.0 and not rows[1].in_expansion_window
    assert rows[1].change_from_previous_ml == pytest.approx(20.0)
    assert rows[1].change_from_baseline_ml == pytest.approx(20.0)  # listed, but not a follow-up
    assert expansion is not None and expansion.baseline_volume_ml == 10.0
    assert expansion.n_followups_in_window == 0


def test_missing_times_are_listed_last_and_ignored(
    trend_sessions: sessionmaker[Session], loaded: dict[str, list[int]]
) -> None:
    untimed_id, base_id, follow_id = loaded["missing-times"]
    with db.transaction(trend_sessions) as session:
        rows = patient_timeline(session, patient_id="missing-times", issuer_of_patient_id=None)
        expansion = patient_expansion(session, patient_id="missing-times", issuer_of_patient_id=None)
    assert [r.study_id for r in rows] == [base_id, follow_id, untimed_id]
    assert [r.scan_number for r in rows] == [1, 2, 3]
    untimed = rows[2]
    assert untimed.study_datetime is None and untimed.hours_since_first is None
    assert not untimed.is_baseline and not untimed.in_expansion_window
    assert untimed.change_from_previous_ml is None and untimed.change_from_baseline_ml is None
    assert untimed.baseline_volume_ml is None
    assert rows[1].change_from_previous_ml == pytest.approx(7.0)  # from the timed baseline, not the untimed scan
    assert expansion is not None
    assert (expansion.baseline_study_id, expansion.n_scans, expansion.n_scans_without_time) == (base_id, 3, 1)


def test_patient_with_only_untimed_scans_has_a_timeline_but_no_expansion_row(
    trend_sessions: sessionmaker[Session],
) -> None:
    with db.transaction(trend_sessions) as session:
        add_scan(session, patient_id="untimed-only", volume_ml=10.0, hours=None)
        add_scan(session, patient_id="untimed-only", volume_ml=30.0, hours=None)
    with db.transaction(trend_sessions) as session:
        rows = patient_timeline(session, patient_id="untimed-only", issuer_of_patient_id=None)
        expansion = patient_expansion(session, patient_id="untimed-only", issuer_of_patient_id=None)
    assert [r.volume_ml for r in rows] == [10.0, 30.0]
    assert all(r.hours_since_first is None and not r.is_baseline for r in rows)
    assert expansion is None


def test_zero_baseline_has_no_percentages(trend_sessions: sessionmaker[Session], loaded: dict[str, list[int]]) -> None:
    with db.transaction(trend_sessions) as session:
        base, follow = patient_timeline(session, patient_id="zero-baseline", issuer_of_patient_id=None)
        expansion = patient_expansion(session, patient_id="zero-baseline", issuer_of_patient_id=None)
    assert base.change_from_baseline_pct is None and base.ratio_to_baseline is None
    assert follow.change_from_baseline_pct is None and follow.ratio_to_baseline is None
    assert follow.change_from_previous_pct is None
    assert follow.change_from_baseline_ml == pytest.approx(6.0)
    assert expansion is not None and expansion.max_growth_pct is None and expansion.max_ratio_to_baseline is None


def test_first_qualifying_follow_up(trend_sessions: sessionmaker[Session], loaded: dict[str, list[int]]) -> None:
    with db.transaction(trend_sessions) as session:
        expansion = patient_expansion(session, patient_id="later-growth", issuer_of_patient_id=None)
    assert expansion is not None
    assert expansion.n_followups_in_window == 2
    assert expansion.expansion_6ml_or_33pct_first_at == at(48)
    assert expansion.max_growth_ml == pytest.approx(7.0)
    assert expansion.max_followup_volume_ml == 27.0


def test_same_patient_id_under_two_issuers_is_two_patients(trend_sessions: sessionmaker[Session]) -> None:
    with db.transaction(trend_sessions) as session:
        a = add_scan(session, patient_id="P-shared", issuer="HOSP-A", volume_ml=10.0, hours=0)
        b = add_scan(session, patient_id="P-shared", issuer="HOSP-B", volume_ml=30.0, hours=24)
        none = add_scan(session, patient_id="P-shared", issuer=None, volume_ml=50.0, hours=30)
        a2 = add_scan(session, patient_id="P-shared", issuer="HOSP-A", volume_ml=12.0, hours=36)
    with db.transaction(trend_sessions) as session:
        timeline_a = patient_timeline(session, patient_id="P-shared", issuer_of_patient_id="HOSP-A")
        timeline_b = patient_timeline(session, patient_id="P-shared", issuer_of_patient_id="HOSP-B")
        timeline_none = patient_timeline(session, patient_id="P-shared", issuer_of_patient_id=None)
        expansions = {
            issuer: patient_expansion(session, patient_id="P-shared", issuer_of_patient_id=issuer)
            for issuer in ("HOSP-A", "HOSP-B", None)
        }
    assert [r.study_id for r in timeline_a] == [a, a2]
    assert [r.study_id for r in timeline_b] == [b]
    assert [r.study_id for r in timeline_none] == [none]
    assert timeline_b[0].is_baseline and timeline_b[0].hours_since_first == 0.0
    assert all(e is not None and not e.expansion_6ml_or_33pct for e in expansions.values())
    assert expansions["HOSP-A"] is not None and expansions["HOSP-A"].max_growth_ml == pytest.approx(2.0)


def test_window_comes_from_trend_config(trend_sessions: sessionmaker[Session]) -> None:
    with db.transaction(trend_sessions) as session:
        add_scan(session, patient_id="P-window", volume_ml=10.0, hours=0)
        add_scan(session, patient_id="P-window", volume_ml=20.0, hours=30)
    with db.transaction(trend_sessions) as session:
        before = patient_expansion(session, patient_id="P-window", issuer_of_patient_id=None)
        assert set_expansion_window(session, hours=24).expansion_window_hours == 24.0
    with db.transaction(trend_sessions) as session:
        after = patient_expansion(session, patient_id="P-window", issuer_of_patient_id=None)
        (_, follow) = patient_timeline(session, patient_id="P-window", issuer_of_patient_id=None)
    assert before is not None and before.expansion_6ml_or_33pct and before.window_hours == 72.0
    assert after is not None and not after.expansion_6ml_or_33pct and after.window_hours == 24.0
    assert not follow.in_expansion_window and follow.window_hours == 24.0


@pytest.mark.parametrize("hours", [0.0, -1.0, float("nan"), float("inf"), 1e6])
def test_window_must_be_positive_and_sane(trend_sessions: sessionmaker[Session], hours: float) -> None:
    with db.transaction(trend_sessions) as session, pytest.raises(ValueError, match="window"):
        set_expansion_window(session, hours=hours)


def _current_versions(session: Session) -> dict[int, tuple[str, float]]:
    c = current_results_view.c
    rows = session.execute(select(c.study_id, c.model_version, c.volume_ml)).all()
    return {int(r[0]): (str(r[1]), float(r[2])) for r in rows}


def test_current_result_is_the_latest_unless_pinned(trend_sessions: sessionmaker[Session]) -> None:
    with db.transaction(trend_sessions) as session:
        both = add_study(session, patient_id="P-pin", when=at(0))
        add_result(session, study_id=both, volume_ml=10.0, model_version="1.0.0", measured_at=at(1))
        add_result(session, study_id=both, volume_ml=16.0, model_version="2.0.0", measured_at=at(200))
        old_only = add_study(session, patient_id="P-pin", when=at(24))
        add_result(session, study_id=old_only, volume_ml=11.0, model_version="1.0.0", measured_at=at(25))
        failed = add_study(session, patient_id="P-pin", when=at(30))
        add_result(session, study_id=failed, volume_ml=0.0, state=RunState.FAILED, error_code="no_usable_series")
    with db.transaction(trend_sessions) as session:
        assert _current_versions(session) == {both: ("2.0.0", 16.0), old_only: ("1.0.0", 11.0)}
        assert sync_trend_config(session, Settings(pinned_model_version="1.0.0")).pinned_model_version == "1.0.0"
    with db.transaction(trend_sessions) as session:
        assert _current_versions(session) == {both: ("1.0.0", 10.0), old_only: ("1.0.0", 11.0)}
        sync_trend_config(session, Settings(pinned_model_version="2.0.0"))
    with db.transaction(trend_sessions) as session:
        assert _current_versions(session) == {both: ("2.0.0", 16.0)}  # no 2.0.0 result: not reported
        sync_trend_config(session, Settings(pinned_model_version=None))
    with db.transaction(trend_sessions) as session:
        assert read_trend_config(session).pinned_model_version is None
        assert set(_current_versions(session)) == {both, old_only}


def test_equal_measurement_times_pick_the_higher_result_id(trend_sessions: sessionmaker[Session]) -> None:
    with db.transaction(trend_sessions) as session:
        study = add_study(session, patient_id="P-tie", when=at(0))
        add_result(session, study_id=study, volume_ml=1.0, model_version="a", measured_at=at(5))
        add_result(session, study_id=study, volume_ml=2.0, model_version="b", measured_at=at(5))
    with db.transaction(trend_sessions) as session:
        assert _current_versions(session) == {study: ("b", 2.0)}


def test_a_re_exported_study_counts_once_newest_version(trend_sessions: sessionmaker[Session]) -> None:
    with db.transaction(trend_sessions) as session:
        add_scan(session, patient_id="P-reexport", volume_ml=10.0, hours=0, study_instance_uid="1.2.3.4")
        newer = add_scan(session, patient_id="P-reexport", volume_ml=11.0, hours=0, study_instance_uid="1.2.3.4")
        follow = add_scan(session, patient_id="P-reexport", volume_ml=18.0, hours=20)
    with db.transaction(trend_sessions) as session:
        rows = patient_timeline(session, patient_id="P-reexport", issuer_of_patient_id=None)
        expansion = patient_expansion(session, patient_id="P-reexport", issuer_of_patient_id=None)
    assert [r.study_id for r in rows] == [newer, follow]
    assert expansion is not None and expansion.baseline_volume_ml == 11.0
    assert expansion.expansion_6ml_or_33pct  # 7 mL from the newest version of the baseline


def test_studies_without_patient_id_are_not_in_the_per_patient_views(
    trend_sessions: sessionmaker[Session],
) -> None:
    with db.transaction(trend_sessions) as session:
        anonymous = add_scan(session, patient_id=None, volume_ml=10.0, hours=0)
        blank = add_scan(session, patient_id="", volume_ml=10.0, hours=0)
    with db.transaction(trend_sessions) as session:
        assert {anonymous, blank} <= set(_current_versions(session))
        ids = session.execute(text("SELECT study_id FROM patient_timeline")).scalars().all()
        patients = session.execute(text("SELECT count(*) FROM hematoma_expansion")).scalar_one()
    assert anonymous not in ids and blank not in ids
    assert patients == 0


def test_expansions_since(trend_sessions: sessionmaker[Session], loaded: dict[str, list[int]]) -> None:
    flagged_6 = {p for p, (_, flags) in SERIES.items() if flags[0]}
    flagged_12 = {p for p, (_, flags) in SERIES.items() if flags[1]}
    with db.transaction(trend_sessions) as session:
        any_found = expansions_since(session, since=at(0))
        found_12 = expansions_since(session, since=at(0), definition=Definition.ML12_5_OR_X1_4)
        # "later-growth" expanded on its 48 h scan; the others at 24 h or 72 h
        night = expansions_since(session, since=at(47), until=at(49), definition=Definition.ML6_OR_PCT33)
        none_yet = expansions_since(session, since=at(100))
    assert {e.patient_id for e in any_found} == flagged_6 | flagged_12
    assert {e.patient_id for e in found_12} == flagged_12
    assert [e.patient_id for e in night] == ["later-growth"]
    assert none_yet == []
    times = [e.expansion_6ml_or_33pct_first_at or e.expansion_12_5ml_or_1_4x_first_at for e in any_found]
    assert times == sorted(t for t in times if t is not None)


def test_expansions_since_refuses_naive_datetimes(trend_sessions: sessionmaker[Session]) -> None:
    with db.transaction(trend_sessions) as session, pytest.raises(ValueError, match="aware"):
        expansions_since(session, since=dt.datetime(2025, 3, 1))


def test_timeline_query_reaches_the_patient_index_on_postgresql(pg_migrated_url: str) -> None:
    """The patient condition is pushed through the window functions down to the studies index."""
    with session_for(pg_migrated_url) as session:
        session.execute(text("SET LOCAL enable_seqscan = off"))
        plan = "\n".join(
            session.execute(
                text("EXPLAIN SELECT * FROM patient_timeline WHERE patient_id = 'P1' AND issuer_key = ''")
            ).scalars()
        )
    assert "ix_studies_patient_id_issuer_of_patient_id_study_datetime" in plan
    assert "Index Cond: ((patient_id IS NOT NULL) AND (patient_id = 'P1'::text))" in plan


def test_night_query_is_evaluated_per_patient_on_postgresql(pg_migrated_url: str) -> None:
    """The night's patients come from the study_datetime index; the view is evaluated per patient."""
    with session_for(pg_migrated_url) as session:
        session.execute(text("SET LOCAL enable_seqscan = off"))
        stmt = expansions_statement(dialect="postgresql", since=at(0), until=at(12), definition=Definition.ANY)
        compiled = stmt.compile(bind=session.get_bind())
        plan = "\n".join(
            row[0] for row in session.connection().exec_driver_sql("EXPLAIN " + str(compiled), compiled.params)
        )
    assert "Index Scan using ix_studies_study_datetime on studies" in plan
    # the lateral patient condition reaches the patient index (no whole-view evaluation)
    assert re.search(r"Index Cond: \(\(patient_id IS NOT NULL\) AND \(patient_id = \w+\.patient_id\)\)", plan), plan


def test_downgrading_the_trend_migration_keeps_the_results(trend_url: str) -> None:
    """Down to the first revision: views, trend_config and the index go; studies and results stay."""
    from alembic import command
    from sqlalchemy import inspect

    with session_for(trend_url) as session:
        study_id = add_scan(session, patient_id="P-down", volume_ml=10.0, hours=0)
    command.downgrade(db.alembic_config(trend_url), "fbbca015efff")
    engine = db.make_engine(trend_url)
    try:
        insp = inspect(engine)
        assert insp.get_view_names() == []
        assert "trend_config" not in insp.get_table_names()
        assert "ix_studies_study_datetime" not in {i["name"] for i in insp.get_indexes("studies")}
        with engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM results")).scalar_one() == 1
    finally:
        engine.dispose()
    db.upgrade_to_head(trend_url)
    with session_for(trend_url) as session:
        (row,) = patient_timeline(session, patient_id="P-down", issuer_of_patient_id=None)
        assert row.study_id == study_id and row.is_baseline
        assert read_trend_config(session).expansion_window_hours == 72.0
