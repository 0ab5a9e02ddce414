"""The trend plot: hematoma volume over time with the expansion thresholds drawn.

Matplotlib is imported when a plot is drawn, and only its object-oriented API is used
(``Figure`` with the Agg canvas): no pyplot, no global backend switch, safe in workers
and threads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from worker.core.notices import DISCLAIMER
from worker.trends.views import TimelineRow, expansion_thresholds

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Figure size in inches and resolution: 1000 x 560 pixels.
FIGURE_SIZE_IN = (10.0, 5.6)
DPI = 100

_THRESHOLD_STYLES = {
    "baseline + 6 mL": ("tab:orange", "--"),
    "baseline x 1.33": ("tab:orange", ":"),
    "baseline + 12.5 mL": ("tab:red", "--"),
    "baseline x 1.4": ("tab:red", ":"),
}


def plot_timeline(*, rows: Sequence[TimelineRow], window_hours: float, out_path: Path) -> Path:
    """Write :func:`draw_timeline`'s figure to ``out_path`` as PNG (1000 x 560 px); return the path."""
    fig = draw_timeline(rows=rows, window_hours=window_hours)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, format="png")
    return out_path


def draw_timeline(*, rows: Sequence[TimelineRow], window_hours: float) -> Figure:
    """A figure of volume (mL) against hours since the first scan.

    ``rows``: one patient's timeline (:func:`worker.trends.queries.patient_timeline`); scans
    without a usable time cannot be placed on the time axis and are counted in the
    caption instead. Drawn: hematoma volume and ABC/2 per scan (markers), the baseline
    (black), follow-ups meeting a definition (red), horizontal lines where each
    criterion is met (baseline + 6 mL, x 1.33, + 12.5 mL, x 1.4; relative ones only for a
    baseline above 0 mL), and vertical lines at the baseline (0 h) and at the window's
    end (``window_hours``). No patient identifier is written into the image.
    Raises ValueError when no row has a usable time.
    """
    from matplotlib.figure import Figure

    if not math.isfinite(window_hours) or window_hours <= 0:
        raise ValueError(f"window_hours must be a positive number of hours, got {window_hours!r}")
    timed = [r for r in rows if r.study_datetime is not None and r.hours_since_first is not None]
    baselines = [r for r in timed if r.is_baseline]
    if not timed or not baselines or baselines[0].baseline_volume_ml is None:
        raise ValueError("no scan with a usable time: nothing to plot")
    baseline_ml = baselines[0].baseline_volume_ml
    hours = [float(r.hours_since_first or 0.0) for r in timed]
    volumes = [r.volume_ml for r in timed]

    fig = Figure(figsize=FIGURE_SIZE_IN, dpi=DPI)
    ax = fig.subplots()
    ax.axvspan(0.0, window_hours, color="tab:blue", alpha=0.06, label=f"expansion window ({window_hours:g} h)")
    ax.axvline(0.0, color="0.4", linewidth=1.0)
    ax.axvline(window_hours, color="tab:blue", linewidth=1.0, linestyle="-.")
    for line in expansion_thresholds(baseline_ml):
        color, style = _THRESHOLD_STYLES[line.label]
        ax.axhline(
            line.volume_ml, color=color, linestyle=style, linewidth=1.0, label=f"{line.label} ({line.volume_ml:.1f} mL)"
        )
    ax.plot(hours, volumes, color="tab:blue", marker="o", label="volume (mL)")
    ax.plot(hours, [r.abc2_ml for r in timed], color="0.5", marker="s", markersize=4, linestyle=":", label="ABC/2 (mL)")
    ax.scatter([hours[0]], [baseline_ml], s=90, facecolors="none", edgecolors="black", zorder=3, label="baseline")
    flagged = [
        (h, r.volume_ml) for h, r in zip(hours, timed, strict=True) if r.meets_6ml_or_33pct or r.meets_12_5ml_or_1_4x
    ]
    if flagged:
        ax.scatter(
            [h for h, _ in flagged],
            [v for _, v in flagged],
            s=90,
            color="tab:red",
            zorder=4,
            label="meets an expansion definition",
        )
    ax.set_xlabel("hours since the first scan")
    ax.set_ylabel("hematoma volume (mL)")
    ax.set_ylim(bottom=0.0)
    right = max(max(hours), window_hours) * 1.05 + 1.0
    ax.set_xlim(-0.02 * right, right)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, framealpha=0.9)
    untimed = len(rows) - len(timed)
    caption = DISCLAIMER + (f"  {untimed} scan(s) without a usable time not shown." if untimed else "")
    ax.set_title("Hematoma volume over time")
    fig.text(0.01, 0.01, caption, fontsize=8, color="0.3")
    fig.tight_layout(rect=(0.0, 0.03, 1.0, 1.0))
    return fig
