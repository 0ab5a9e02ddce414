"""``ichvol trends``: the timeline table, the PNG plot, the expansion list, and bad input."""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from tests.helpers.trends import add_scan, at, session_for, trend_sessions, trend_url
from worker.cli import trends as trends_command
from worker.cli.trends import parse_since
from worker.core.notices import DISCLAIMER
from worker.core.settings import Settings
from worker.infra import db
from worker.infra.trend_config import read_trend_config
from worker.trends.views import TimelineRow, expansion_thresholds

__all__ = ["trend_sessions", "trend_url"]  # fixtures, used by name

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run(url: str, *argv: str) -> int:
    """``ichvol trends ARGV`` against the database at ``url``, through the real parser options."""
    parser = argparse.ArgumentParser(prog="ichvol trends")
    trends_command.add_arguments(parser)
    args = parser.parse_args(list(argv))
    return trends_command.run(args, Settings(database_url=url))


def load_patients(sessions: sessionmaker[Session]) -> None:
    with db.transaction(sessions) as session:
        # P-grow: baseline 20 mL, 27 mL at 24 h (7 mL, 35 %: 6 mL / 33 % only), one scan without a time
        add_scan(session, patient_id="P-grow", volume_ml=20.0, hours=0)
        add_scan(session, patient_id="P-grow", volume_ml=27.0, hours=24)
        add_scan(session, patient_id="P-grow", volume_ml=5.0, hours=None)
        # P-big: 10 -> 25 mL at 30 h: both definitions
        add_scan(session, patient_id="P-big", volume_ml=10.0, hours=6)
        add_scan(session, patient_id="P-big", volume_ml=25.0, hours=36)
        # P-stable: no expansion
        add_scan(session, patient_id="P-stable", volume_ml=30.0, hours=0)
        add_scan(session, patient_id="P-stable", volume_ml=31.0, hours=24)
        # P-two: the same PatientID under two issuers
        add_scan(session, patient_id="P-two", issuer="HOSP-A", volume_ml=10.0, hours=0)
        add_scan(session, patient_id="P-two", issuer=None, volume_ml=40.0, hours=5)
        # P-untimed: no usable time at all
        add_scan(session, patient_id="P-untimed", volume_ml=8.0, hours=None)


@pytest.fixture()
def url(trend_url: str, trend_sessions: sessionmaker[Session]) -> str:
    load_patients(trend_sessions)
    return trend_url


def test_timeline_table_and_plot(url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plot = tmp_path / "out" / "trend.png"
    assert run(url, "--patient", "P-grow", "--plot", str(plot)) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    table = [line.split() for line in lines[2:5]]
    assert table[0][:6] == ["1", "2025-03-01", "08:00", "0.0", "20.00", "22.00"]
    assert table[0][-1] == "baseline"
    assert table[1][:4] == ["2", "2025-03-02", "08:00", "24.0"]
    assert table[1][5:10] == ["29.70", "+7.00", "+35.0", "+7.00", "+35.0"]
    assert table[1][-1] == "6mL/33%"
    assert table[2][:3] == ["3", "-", "-"] and out.count("no usable time") == 1
    assert "growth >= 6 mL or >= 33 %: EXPANSION (first on the scan of 2025-03-02 08:00)" in out
    assert "growth >= 12.5 mL or ratio >= 1.4: no expansion" in out
    assert "expansion window: 72 h" in out and "latest result per study" in out
    assert DISCLAIMER in out
    assert f"plot: {plot}" in out
    data = plot.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1000, 560)


def test_no_plot(url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert run(url, "--patient", "P-stable", "--no-plot") == 0
    assert list(cwd.iterdir()) == []


def test_default_plot_path(url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert run(url, "--patient", "P-stable") == 0
    assert [p.name for p in cwd.iterdir()] == ["ichvol-trend.png"]
    assert (cwd / "ichvol-trend.png").read_bytes().startswith(PNG_SIGNATURE)


def test_patient_without_usable_times(url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(url, "--patient", "P-untimed", "--plot", str(tmp_path / "p.png")) == 0
    out = capsys.readouterr().out
    assert "expansion cannot be assessed" in out and "no plot" in out
    assert not (tmp_path / "p.png").exists()


def test_unknown_patient_exits_2_with_one_line(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(url, "--patient", "NOBODY", "--no-plot") == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "ichvol: no measured study for PatientID 'NOBODY'\n"


def test_patient_under_two_issuers_needs_issuer(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(url, "--patient", "P-two", "--no-plot") == 2
    err = capsys.readouterr().err
    assert "several issuers ((none), 'HOSP-A')" in err and "--issuer" in err
    assert run(url, "--patient", "P-two", "--issuer", "HOSP-A", "--no-plot") == 0
    assert "10.00" in capsys.readouterr().out
    assert run(url, "--patient", "P-two", "--issuer", "", "--no-plot") == 0
    assert "40.00" in capsys.readouterr().out
    assert run(url, "--patient", "P-two", "--issuer", "HOSP-Z", "--no-plot") == 2
    assert "issuer 'HOSP-Z'" in capsys.readouterr().err


def test_expansions_since(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(url, "--expansions", "--since", "2025-03-01") == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines()[2:] if line.startswith("P-")]
    assert listed == ["P-grow", "P-big"]  # by the time the expansion appeared: 2 March 08:00, then 20:00
    assert "2 patient(s) meet any since 2025-03-01 00:00 (UTC)" in out and DISCLAIMER in out

    assert run(url, "--expansions", "--since", "2025-03-01", "--definition", "12_5ml_or_1_4x") == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines() if line.startswith("P-")] == ["P-big"]

    assert run(url, "--expansions", "--since", "2025-03-02T12:00", "--until", "2025-03-03") == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines() if line.startswith("P-")] == ["P-big"]

    assert run(url, "--expansions", "--since", "2025-03-04") == 0
    assert "no patient meets any on a follow-up acquired since 2025-03-04 00:00 (UTC)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--expansions"], "--expansions needs --since DATE"),
        (["--expansions", "--since", "yesterday"], "'yesterday' is not a date"),
        (["--expansions", "--since", "2025-03-02", "--until", "2025-03-01"], "--until must be after --since"),
        (["--set-window", "0"], "--set-window: the expansion window must be more than 0"),
        (["--set-window", "nan"], "--set-window: the expansion window must be more than 0"),
        (["--patient", "  "], "--patient needs a non-empty PatientID"),
        (["--patient", "P-grow", "--since", "2025-03-01"], "--since and --until go with --expansions"),
    ],
)
def test_bad_input_exits_2(url: str, capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    assert run(url, *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ichvol: " + message) and err.count("\n") == 1


def test_unwritable_plot_path_exits_2(url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert run(url, "--patient", "P-grow", "--plot", str(blocker / "trend.png")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ichvol: cannot write the plot to {blocker / 'trend.png'}") and err.count("\n") == 1


def test_set_window(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(url, "--set-window", "24") == 0
    assert "expansion window set to 24 h" in capsys.readouterr().out
    with session_for(url) as session:
        assert read_trend_config(session).expansion_window_hours == 24.0
    # P-big's follow-up is 30 h after its baseline: outside a 24 h window
    assert run(url, "--expansions", "--since", "2025-03-01") == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines() if line.startswith("P-")] == ["P-grow"]


def test_database_without_trend_views_exits_2(pg_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(pg_url, "--patient", "P1", "--no-plot") == 2
    err = capsys.readouterr().err
    assert "the database has no trend views" in err and "alembic upgrade head" in err
    assert err.count("\n") == 1


def test_through_the_ichvol_command(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``worker.cli.main`` with ``--database-url``."""
    from worker import cli

    parser = cli.build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert "trends" in subcommands.choices
    assert cli.main(["trends", "--database-url", url, "--patient", "NOBODY", "--no-plot"]) == 2
    assert "no measured study for PatientID 'NOBODY'" in capsys.readouterr().err
    assert cli.main(["trends", "--database-url", url, "--patient", "P-grow", "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "27.00" in out and DISCLAIMER in out


# --- pure parts ---------------------------------------------------------------------------------


def test_expansion_thresholds() -> None:
    lines = expansion_thresholds(30.0)
    assert [line.label for line in lines] == [
        "baseline + 6 mL",
        "baseline x 1.33",
        "baseline x 1.4",
        "baseline + 12.5 mL",
    ]
    assert [line.volume_ml for line in lines] == pytest.approx([36.0, 39.9, 42.0, 42.5])
    # a 0 mL baseline: the relative criteria do not apply
    assert [(line.label, line.volume_ml) for line in expansion_thresholds(0.0)] == [
        ("baseline + 6 mL", 6.0),
        ("baseline + 12.5 mL", 12.5),
    ]
    with pytest.raises(ValueError, match="baseline volume"):
        expansion_thresholds(-1.0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-03-01", dt.datetime(2025, 3, 1, tzinfo=dt.UTC)),
        ("2025-03-01T22:30", dt.datetime(2025, 3, 1, 22, 30, tzinfo=dt.UTC)),
        ("2025-03-01T08:00+01:00", dt.datetime(2025, 3, 1, 7, 0, tzinfo=dt.UTC)),
    ],
)
def test_parse_since(text: str, expected: dt.datetime) -> None:
    assert parse_since(text) == expected


def _row(
    n: int, hours: float | None, volume_ml: float, *, baseline_ml: float | None, flagged: bool = False
) -> TimelineRow:
    return TimelineRow(
        scan_number=n,
        study_id=n,
        study_instance_uid=None,
        accession_number=None,
        study_datetime=None if hours is None else at(hours),
        hours_since_first=hours,
        volume_ml=volume_ml,
        abc2_ml=volume_ml,
        model_version="1.0.0",
        is_baseline=n == 1,
        baseline_volume_ml=baseline_ml,
        change_from_previous_ml=None,
        change_from_previous_pct=None,
        change_from_baseline_ml=None,
        change_from_baseline_pct=None,
        ratio_to_baseline=None,
        window_hours=72.0,
        in_expansion_window=hours is not None and 0 < hours <= 72,
        meets_6ml_or_33pct=flagged,
        meets_12_5ml_or_1_4x=False,
    )


def test_plot_draws_thresholds_window_and_points() -> None:
    from worker.trends.plot import draw_timeline

    rows = [
        _row(1, 0.0, 30.0, baseline_ml=30.0),
        _row(2, 24.0, 37.0, baseline_ml=30.0, flagged=True),
        _row(3, None, 50.0, baseline_ml=None),
    ]
    fig = draw_timeline(rows=rows, window_hours=48.0)
    (ax,) = fig.axes
    horizontal = sorted(
        float(line.get_ydata()[0])
        for line in ax.get_lines()
        if len(set(line.get_ydata())) == 1 and len(line.get_ydata()) == 2 and list(line.get_xdata()) == [0, 1]
    )
    assert horizontal == pytest.approx([36.0, 39.9, 42.0, 42.5])
    vertical = sorted(float(line.get_xdata()[0]) for line in ax.get_lines() if list(line.get_ydata()) == [0, 1])
    assert vertical == [0.0, 48.0]
    volume = next(line for line in ax.get_lines() if line.get_label() == "volume (mL)")
    assert list(volume.get_xdata()) == [0.0, 24.0]  # the scan without a time is not placed
    assert list(volume.get_ydata()) == [30.0, 37.0]
    assert any("1 scan(s) without a usable time not shown" in t.get_text() for t in fig.texts)
    assert any(DISCLAIMER in t.get_text() for t in fig.texts)


def test_plot_refuses_a_timeline_without_times() -> None:
    from worker.trends.plot import draw_timeline

    with pytest.raises(ValueError, match="no scan with a usable time"):
        draw_timeline(rows=[_row(1, None, 5.0, baseline_ml=None)], window_hours=72.0)
