"""The evaluation report: the paper's figures (matplotlib, Agg) and one HTML page that shows everything.

Research use only, not for clinical use.

Figures (PNG, written into the report folder; :data:`FIGURES` names them):

``fig1a_boxplots.png``
    The paper's Fig. 1A: box plots of Dice, Jaccard, sensitivity and precision per method,
    one value per hematoma slice (slices whose truth holds hematoma; undefined values, such
    as the precision of a slice where nothing was predicted, are left out; see
    :mod:`worker.research.metrics`). Boxes: quartiles; whiskers: 1.5 IQR; the mean as a triangle.
``fig2_volume_correlation.png``
    The paper's Fig. 2 (left): predicted against true volume (mL) per patient for DR-UNet,
    UNet and ABC/2, the identity line, the least-squares line, RMSE and R^2.
``fig2_volume_error.png``
    The paper's Fig. 2 (right): the error (predicted - true, mL) of every patient, patients
    ordered by true volume, one marker per method.
``bland_altman.png``
    Bland-Altman plots for the same methods: difference against the mean of predicted and
    true volume, the bias and the limits of agreement (bias +- 1.96 SD).

The HTML page (``report.html``) is self-contained within the folder: it links the figures,
the CSV files and the overlays by relative paths, uses no scripts and no network.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from worker.core.notices import DISCLAIMER
from worker.research.metrics import METRIC_NAMES, Summary, VolumeAgreement

__all__ = [
    "FIGURES",
    "CaseExample",
    "ReportData",
    "TableRow",
    "write_case_overlay",
    "write_figures",
    "write_html",
]

FIGURES = {
    "boxplots": "fig1a_boxplots.png",
    "volume_correlation": "fig2_volume_correlation.png",
    "volume_error": "fig2_volume_error.png",
    "bland_altman": "bland_altman.png",
}
BOX_METRICS = ("dice", "jaccard", "sensitivity", "precision")
TRUTH_BGR = (0, 200, 0)  # green
METHOD_BGR = {"drunet": (0, 0, 255), "unet": (255, 128, 0), "fcm": (0, 200, 255), "active_contour": (255, 0, 255)}
F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class TableRow:
    """One row of the metrics table: a method at one level (e.g. hematoma slices)."""

    method: str  # display name
    level: str  # "hematoma slices", "all slices", "patients with hematoma", "all patients"
    summaries: Mapping[str, Summary]  # metric name -> summary


@dataclass(frozen=True)
class CaseExample:
    """An overlay picture of one case for the page (path relative to the report folder)."""

    title: str
    image: str
    caption: str


@dataclass(frozen=True)
class ReportData:
    """Everything the figures and the page show."""

    methods: Sequence[str]  # method keys with masks, in display order
    names: Mapping[str, str]  # method key -> display name
    hematoma_slice_values: Mapping[str, Mapping[str, F64]]  # method -> metric -> values
    true_ml: F64  # (patients,)
    predicted_ml: Mapping[str, F64]  # method -> (patients,), for the volume figures
    agreement: Mapping[str, VolumeAgreement]
    seconds: Mapping[str, Summary]  # method -> seconds per scan
    table: Sequence[TableRow]
    examples: Sequence[CaseExample] = ()
    failures: Sequence[tuple[str, str]] = ()  # (study, reason)
    details: Mapping[str, str] = field(default_factory=dict)  # heading facts: models, data, date
    csv_files: Sequence[str] = ()
    notes: Sequence[str] = ()  # definitions shown under the tables


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finite(values: np.ndarray) -> F64:
    v = np.asarray(values, dtype=np.float64)
    out: F64 = v[np.isfinite(v)]
    return out


def _boxplots(path: Path, data: ReportData) -> None:
    plt = _pyplot()
    methods = list(data.methods)
    fig, axes = plt.subplots(1, len(BOX_METRICS), figsize=(3.2 * len(BOX_METRICS), 4.2), squeeze=False)
    for ax, metric in zip(axes[0], BOX_METRICS, strict=True):
        series = [_finite(data.hematoma_slice_values.get(m, {}).get(metric, np.zeros(0))) for m in methods]
        positions = [i + 1 for i, s in enumerate(series) if s.size]
        present = [s for s in series if s.size]
        if present:
            ax.boxplot(present, positions=positions, widths=0.6, showmeans=True)
        ax.set_xticks(range(1, len(methods) + 1))
        ax.set_xticklabels([data.names[m] for m in methods], rotation=30, ha="right")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(metric.capitalize())
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Per hematoma slice (paper Fig. 1A)", fontsize=10)
    fig.text(0.01, 0.01, DISCLAIMER, fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _volume_methods(data: ReportData) -> list[str]:
    return [m for m in ("drunet", "unet", "abc2") if m in data.predicted_ml]


def _number(value: float, digits: int = 2) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _correlation(path: Path, data: ReportData) -> None:
    plt = _pyplot()
    methods = _volume_methods(data)
    fig, axes = plt.subplots(1, max(1, len(methods)), figsize=(4.2 * max(1, len(methods)), 4.2), squeeze=False)
    truth = np.asarray(data.true_ml, dtype=np.float64)
    top = max(1.0, float(np.nanmax(truth)) if truth.size else 1.0)
    for m in methods:
        top = max(top, float(np.nanmax(data.predicted_ml[m])) if len(data.predicted_ml[m]) else 0.0)
    top *= 1.08
    for ax, m in zip(axes[0], methods, strict=False):
        pred = np.asarray(data.predicted_ml[m], dtype=np.float64)
        ax.scatter(truth, pred, s=18, alpha=0.8)
        ax.plot([0, top], [0, top], color="grey", lw=1, ls="--", label="identity")
        agreement = data.agreement.get(m)
        if agreement is not None and math.isfinite(agreement.slope):
            ax.plot(
                [0, top], [agreement.intercept_ml, agreement.intercept_ml + agreement.slope * top], lw=1, label="fit"
            )
        text = f"RMSE {_number(agreement.rmse_ml)} mL\nR² {_number(agreement.r2, 3)}" if agreement is not None else ""
        ax.text(0.04, 0.96, text, transform=ax.transAxes, va="top", fontsize=9)
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
        ax.set_xlabel("true volume (mL)")
        ax.set_ylabel(f"{data.names[m]} volume (mL)")
        ax.set_title(data.names[m])
        ax.legend(loc="lower right", fontsize=8)
    fig.text(0.01, 0.01, DISCLAIMER, fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _errors(path: Path, data: ReportData) -> None:
    plt = _pyplot()
    methods = _volume_methods(data)
    truth = np.asarray(data.true_ml, dtype=np.float64)
    order = np.argsort(truth, kind="stable")
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * truth.size + 3), 4.2))
    markers = {"drunet": "o", "unet": "s", "abc2": "^"}
    x = np.arange(truth.size)
    for m in methods:
        error = np.asarray(data.predicted_ml[m], dtype=np.float64)[order] - truth[order]
        ax.plot(x, error, ls="none", marker=markers.get(m, "o"), label=data.names[m], alpha=0.8)
    ax.axhline(0.0, color="grey", lw=1)
    ax.set_xlabel("patient (ordered by true volume)")
    ax.set_ylabel("error, predicted - true (mL)")
    ax.set_title("Volume error per patient (paper Fig. 2)")
    if methods:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.text(0.01, 0.01, DISCLAIMER, fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _bland_altman(path: Path, data: ReportData) -> None:
    plt = _pyplot()
    methods = _volume_methods(data)
    fig, axes = plt.subplots(1, max(1, len(methods)), figsize=(4.4 * max(1, len(methods)), 4.2), squeeze=False)
    truth = np.asarray(data.true_ml, dtype=np.float64)
    for ax, m in zip(axes[0], methods, strict=False):
        pred = np.asarray(data.predicted_ml[m], dtype=np.float64)
        ax.scatter((pred + truth) / 2.0, pred - truth, s=18, alpha=0.8)
        agreement = data.agreement.get(m)
        if agreement is not None:
            ax.axhline(agreement.bias_ml, color="C1", lw=1, label=f"bias {_number(agreement.bias_ml)} mL")
            if math.isfinite(agreement.sd_error_ml):
                for value in (agreement.loa_low_ml, agreement.loa_high_ml):
                    ax.axhline(value, color="C3", lw=1, ls="--")
                ax.plot([], [], color="C3", ls="--", label="bias ± 1.96 SD")
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xlabel("mean of predicted and true (mL)")
        ax.set_ylabel("predicted - true (mL)")
        ax.set_title(f"Bland-Altman: {data.names[m]}")
        ax.legend(fontsize=8)
    fig.text(0.01, 0.01, DISCLAIMER, fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_figures(report_dir: Path, data: ReportData) -> dict[str, Path]:
    """Write every figure of :data:`FIGURES` into ``report_dir``; returns their paths by key."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    paths = {key: report_dir / name for key, name in FIGURES.items()}
    _boxplots(paths["boxplots"], data)
    _correlation(paths["volume_correlation"], data)
    _errors(paths["volume_error"], data)
    _bland_altman(paths["bland_altman"], data)
    return paths


def write_case_overlay(
    path: Path,
    *,
    hu: np.ndarray,
    truth: np.ndarray,
    predictions: Mapping[str, np.ndarray],
    names: Mapping[str, str],
    title: str,
    tile_px: int = 320,
) -> Path:
    """One slice of a case with the truth (green) and each method's outline, as PNG.

    ``hu`` ``(rows, columns)`` HU of the slice, ``truth`` and each prediction the masks of
    that slice (non-zero = hematoma). Brain window (level 40, width 80 HU). The title, a
    colour legend and the disclaimer are written above the image.
    """
    from worker.outputs.overlay import brain_window_uint8

    rows, columns = hu.shape
    scale = tile_px / max(rows, columns)
    width, height = max(1, round(columns * scale)), max(1, round(rows * scale))
    grey = brain_window_uint8(hu)
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_NEAREST
    grey = np.asarray(cv2.resize(grey, (width, height), interpolation=interpolation), dtype=np.uint8)
    tile = np.repeat(grey[:, :, None], 3, axis=2)

    def outline(mask: np.ndarray, colour: tuple[int, int, int]) -> None:
        binary = (np.asarray(mask) != 0).astype(np.uint8)
        if not binary.any():
            return
        big = np.asarray(cv2.resize(binary, (width, height), interpolation=cv2.INTER_NEAREST), dtype=np.uint8)
        contours, _ = cv2.findContours(big, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(tile, contours, -1, colour, thickness=1)

    outline(truth, TRUTH_BGR)
    for key, mask in predictions.items():
        outline(mask, METHOD_BGR.get(key, (255, 255, 255)))
    legend = "truth: green; " + "; ".join(
        f"{names.get(k, k)}: {_colour_name(METHOD_BGR.get(k, (255, 255, 255)))}" for k in predictions
    )
    lines = [title, legend, DISCLAIMER]
    font, font_scale, line_px = cv2.FONT_HERSHEY_SIMPLEX, 0.42, 18
    text_width = max(cv2.getTextSize(t, font, font_scale, 1)[0][0] for t in lines) + 12
    sheet_width = max(width, text_width)
    sheet = np.zeros((line_px * len(lines) + 8 + height, sheet_width, 3), dtype=np.uint8)
    for n, text in enumerate(lines):
        cv2.putText(sheet, text, (6, 14 + n * line_px), font, font_scale, (255, 255, 255), 1, cv2.LINE_AA)
    sheet[line_px * len(lines) + 8 :, :width] = tile
    from worker.imaging.image_io import write_png

    return write_png(Path(path), sheet)


def _colour_name(bgr: tuple[int, int, int]) -> str:
    return {
        (0, 0, 255): "red",
        (255, 128, 0): "blue",
        (0, 200, 255): "yellow",
        (255, 0, 255): "magenta",
    }.get(bgr, "white")


# --- HTML ------------------------------------------------------------------------------------


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _summary_cell(summary: Summary | None, digits: int = 3) -> str:
    if summary is None or summary.n == 0:
        return "n/a"
    sd = "" if math.isnan(summary.sd) else f" ± {summary.sd:.{digits}f}"
    return f"{summary.mean:.{digits}f}{sd}"


def _metrics_table(data: ReportData) -> str:
    head = "".join(f"<th>{_e(m)}</th>" for m in METRIC_NAMES)
    rows = []
    for row in data.table:
        n = max((s.n for s in row.summaries.values()), default=0)
        cells = "".join(f"<td>{_e(_summary_cell(row.summaries.get(m)))}</td>" for m in METRIC_NAMES)
        rows.append(f"<tr><td>{_e(row.method)}</td><td>{_e(row.level)}</td><td>{n}</td>{cells}</tr>")
    return (
        "<table><thead><tr><th>method</th><th>level</th><th>n</th>"
        f"{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _agreement_table(data: ReportData) -> str:
    rows = []
    for key, a in data.agreement.items():
        seconds = _summary_cell(data.seconds.get(key), 2)
        rows.append(
            "<tr>"
            f"<td>{_e(data.names.get(key, key))}</td><td>{a.n}</td><td>{_number(a.rmse_ml)}</td>"
            f"<td>{_number(a.sd_error_ml)}</td><td>{_number(a.mae_ml)}</td><td>{_number(a.r2, 3)}</td>"
            f"<td>{_number(a.pearson_r2, 3)}</td><td>{_number(a.bias_ml)}</td>"
            f"<td>{_number(a.loa_low_ml)} to {_number(a.loa_high_ml)}</td><td>{_e(seconds)}</td>"
            "</tr>"
        )
    return (
        "<table><thead><tr><th>method</th><th>n</th><th>RMSE (mL)</th><th>SD of error (mL)</th>"
        "<th>MAE (mL)</th><th>R² (identity)</th><th>Pearson r²</th><th>bias (mL)</th>"
        "<th>limits of agreement (mL)</th><th>seconds per scan</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


_STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 1300px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.5em; text-align: right; }
th { background: #eee; } td:first-child, td:nth-child(2) { text-align: left; }
.disclaimer { background: #fff3cd; border: 1px solid #e0c060; padding: 0.6em; font-weight: bold; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
figcaption { font-size: 0.85em; max-width: 640px; }
img { max-width: 100%; border: 1px solid #ccc; }
"""


def write_html(report_dir: Path, data: ReportData, *, figures: Mapping[str, Path], title: str) -> Path:
    """Write ``report.html``: tables, figures, example overlays, failures, definitions and links."""
    report_dir = Path(report_dir)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="disclaimer">{_e(DISCLAIMER)}</p>',
    ]
    if data.details:
        items = "".join(f"<li><b>{_e(k)}</b>: {_e(v)}</li>" for k, v in data.details.items())
        parts.append(f"<ul>{items}</ul>")
    parts += ["<h2>Segmentation metrics (mean ± SD)</h2>", _metrics_table(data)]
    if data.notes:
        parts.append("<ul>" + "".join(f"<li>{_e(n)}</li>" for n in data.notes) + "</ul>")
    parts += ["<h2>Volume agreement with the ground-truth mask volume</h2>", _agreement_table(data)]
    parts.append("<h2>Figures</h2>")
    captions = {
        "boxplots": "Dice, Jaccard, sensitivity and precision per hematoma slice, per method (paper Fig. 1A).",
        "volume_correlation": "Predicted against true volume per patient (paper Fig. 2).",
        "volume_error": "Volume error per patient, ordered by true volume (paper Fig. 2).",
        "bland_altman": "Bland-Altman plots: bias and limits of agreement.",
    }
    for key, path in figures.items():
        rel = Path(path).relative_to(report_dir).as_posix()
        parts.append(
            f'<figure><a href="{_e(rel)}"><img src="{_e(rel)}" alt="{_e(key)}"></a>'
            f"<figcaption>{_e(captions.get(key, key))}</figcaption></figure>"
        )
    if data.examples:
        parts.append("<h2>Best and worst cases (DR-UNet Dice per patient)</h2>")
        for example in data.examples:
            parts.append(
                f'<figure><img src="{_e(example.image)}" alt="{_e(example.title)}">'
                f"<figcaption><b>{_e(example.title)}</b>: {_e(example.caption)}</figcaption></figure>"
            )
    if data.failures:
        parts.append("<h2>Studies that could not be evaluated</h2><ul>")
        parts += [f"<li>{_e(study)}: {_e(reason)}</li>" for study, reason in data.failures]
        parts.append("</ul>")
    if data.csv_files:
        links = "".join(f'<li><a href="{_e(name)}">{_e(name)}</a></li>' for name in data.csv_files)
        parts.append(f"<h2>Data</h2><ul>{links}</ul>")
    parts.append(f'<p class="disclaimer">{_e(DISCLAIMER)}</p></body></html>')
    path = report_dir / "report.html"
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path
