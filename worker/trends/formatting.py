"""The trend views as text: a patient's timeline table and the list of expansions, with the disclaimer."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from worker.core.notices import DISCLAIMER
from worker.infra.trend_config import TrendSettings
from worker.trends.views import Definition, Expansion, TimelineRow


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
