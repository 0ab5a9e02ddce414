"""The report's figures, overlay and HTML page on hand-made data, edge cases included."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from worker.core.notices import DISCLAIMER
from worker.research import metrics, report


def _data(n: int = 5, *, study: str = "case-1", nan: bool = True) -> report.ReportData:
    rng = np.random.default_rng(0)
    truth = np.linspace(2.0, 60.0, n)
    predicted = {"drunet": truth * 1.1 + 1.0, "unet": truth * 0.8, "abc2": truth * 0.65}
    dice = rng.uniform(0.5, 0.95, 12)
    if nan:
        dice[0] = np.nan  # undefined values must not break the plots
    slice_values = {
        m: {k: dice.copy() for k in report.BOX_METRICS} for m in ("drunet", "unet", "fcm", "active_contour")
    }
    agreement = {m: metrics.volume_agreement(true_ml=truth, predicted_ml=v) for m, v in predicted.items()}
    summaries = {name: metrics.summarize(dice) for name in metrics.METRIC_NAMES}
    return report.ReportData(
        methods=("drunet", "unet", "fcm", "active_contour"),
        names={"drunet": "DR-UNet", "unet": "UNet", "abc2": "ABC/2", "fcm": "FCM", "active_contour": "AC"},
        hematoma_slice_values=slice_values,
        true_ml=truth,
        predicted_ml=predicted,
        agreement=agreement,
        seconds={m: metrics.summarize([1.0, 2.0]) for m in predicted},
        table=[report.TableRow("DR-UNet", "hematoma slices", summaries)],
        examples=[report.CaseExample(title=f"Best case: {study}", image="cases/x/overlay.png", caption="Dice 0.9")],
        failures=[("<bad & study>", "no ground-truth mask [missing_pixel_data]")],
        details={"studies": "5 evaluated"},
        csv_files=("cases.csv",),
        notes=("Hematoma slices: slices whose truth holds hematoma.",),
    )


def test_every_figure_is_a_readable_png(tmp_path: Path) -> None:
    paths = report.write_figures(tmp_path, _data())
    assert set(paths) == set(report.FIGURES)
    for path in paths.values():
        image = cv2.imread(str(path))
        assert image is not None and image.shape[0] > 200 and image.shape[1] > 300, path.name


def test_figures_survive_a_single_patient(tmp_path: Path) -> None:
    paths = report.write_figures(tmp_path, _data(n=1))
    for path in paths.values():
        assert cv2.imread(str(path)) is not None


def test_the_page_references_every_figure_and_escapes_names(tmp_path: Path) -> None:
    data = _data(study="<script>alert(1)</script>")
    figures = report.write_figures(tmp_path, data)
    page = report.write_html(tmp_path, data, figures=figures, title="Evaluation").read_text()
    for name in report.FIGURES.values():
        assert f'src="{name}"' in page
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "&lt;bad &amp; study&gt;" in page
    assert page.count(DISCLAIMER) == 2
    # mean ± SD of the summary, with its n
    summary = metrics.summarize(data.hematoma_slice_values["drunet"]["dice"])
    assert f"{summary.mean:.3f} ± {summary.sd:.3f}" in page
    assert f"<td>{summary.n}</td>" in page


def test_case_overlay_draws_truth_in_green_and_the_prediction_in_red(tmp_path: Path) -> None:
    hu = np.full((40, 40), 30.0, np.float32)
    truth = np.zeros((40, 40), np.uint8)
    truth[10:20, 10:20] = 1
    prediction = np.zeros_like(truth)
    prediction[24:34, 24:34] = 1
    path = report.write_case_overlay(
        tmp_path / "overlay.png",
        hu=hu,
        truth=truth,
        predictions={"drunet": prediction},
        names={"drunet": "DR-UNet"},
        title="case",
        tile_px=160,
    )
    image = cv2.imread(str(path))
    body = image[-160:]  # the tile below the text band
    green = (body[..., 1] == 200) & (body[..., 0] == 0) & (body[..., 2] == 0)
    red = (body[..., 2] == 255) & (body[..., 0] == 0) & (body[..., 1] == 0)
    assert green.any() and red.any()
    ys, xs = np.nonzero(green)
    assert xs.min() >= 35 and xs.max() <= 84 and ys.min() >= 35 and ys.max() <= 84  # around rows/cols 10-20 x4
    ys, xs = np.nonzero(red)
    assert xs.min() >= 90 and ys.min() >= 90
