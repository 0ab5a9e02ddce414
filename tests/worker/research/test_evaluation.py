"""``ichvol evaluate`` on phantom studies: every report file, numbers that tie back to the truth and the pipeline."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.labelled_data import write_phantom_studies
from tests.helpers.segmenters import HuBandSegmenter
from worker import cli
from worker.model.engines import resolve_engine
from worker.research import metrics
from worker.research.evaluation import evaluate
from worker.research.report import FIGURES

REPORT_FILES = (
    "report.html",
    "cases.csv",
    "slices.csv",
    "metrics.csv",
    "volumes.csv",
    "failures.csv",
    "summary.json",
    *FIGURES.values(),
)


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six phantom studies (five with blood, one without) and one study without truth."""
    root = tmp_path_factory.mktemp("eval") / "studies"
    write_phantom_studies(root, 6, size=64, slices=10)
    shutil.copytree(root / "study-00", root / "study-99-no-truth")
    shutil.rmtree(root / "study-99-no-truth" / "truth")
    return root


@pytest.fixture(scope="module")
def evaluated(studies: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("report") / "report"
    result = evaluate(
        studies_dir=studies,
        out_dir=out,
        drunet=HuBandSegmenter(input_size=64),
        unet=HuBandSegmenter(input_size=32, band_hu=(45, 95)),
    )
    return out, result


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_every_report_file_is_written_and_the_page_references_every_figure(evaluated: tuple[Path, object]) -> None:
    out, _ = evaluated
    for name in REPORT_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    page = (out / "report.html").read_text()
    sources = set(re.findall(r'src="([^"]+)"', page))
    assert set(FIGURES.values()) <= sources
    for source in sources:
        assert (out / source).is_file(), source  # every picture the page shows is in the folder
    assert "Best case" in page and "Worst case" in page
    assert {"cases.csv", "metrics.csv", "volumes.csv"} <= set(re.findall(r'href="([^"]+\.csv)"', page))
    assert "Research use only, not for clinical use." in page
    for figure in FIGURES.values():
        assert (out / figure).read_bytes().startswith(b"\x89PNG")


def test_a_study_without_truth_is_listed_and_left_out(evaluated: tuple[Path, object]) -> None:
    out, result = evaluated
    failures = _rows(out / "failures.csv")
    assert [f["study"] for f in failures] == ["study-99-no-truth"]
    assert "no ground-truth mask" in failures[0]["reason"]
    assert len(result.cases) == 6  # type: ignore[attr-defined]
    assert "study-99-no-truth" in (out / "report.html").read_text()


def test_volumes_tie_back_to_the_phantom_truth_and_the_deployed_pipeline(
    evaluated: tuple[Path, object], studies: Path
) -> None:
    out, _ = evaluated
    rows = _rows(out / "cases.csv")
    methods = {r["method"] for r in rows}
    assert methods == {"drunet", "unet", "abc2", "abc2_truth", "fcm", "active_contour"}
    for row in (r for r in rows if r["method"] == "drunet"):
        truth = json.loads((studies / row["study"] / "truth" / "truth.json").read_text())
        assert float(row["truth_ml"]) == pytest.approx(truth["mask_volume_ml"], rel=1e-6)
        pipeline = json.loads((out / "cases" / row["study"] / "drunet" / "result.json").read_text())
        assert float(row["volume_ml"]) == pytest.approx(pipeline["volume_ml"], abs=1e-3)
        assert float(row["error_ml"]) == pytest.approx(float(row["volume_ml"]) - float(row["truth_ml"]), abs=1e-5)
        assert float(row["seconds"]) > 0
    blood_free = [r for r in rows if r["method"] == "drunet" and float(r["truth_ml"]) == 0.0]
    assert len(blood_free) == 1
    # no truth: Dice 1 if nothing was found, 0 otherwise; sensitivity undefined (empty cell)
    assert float(blood_free[0]["dice"]) == (1.0 if float(blood_free[0]["volume_ml"]) == 0 else 0.0)
    assert blood_free[0]["sensitivity"] == ""


def test_slice_metrics_are_recomputed_from_the_saved_masks(evaluated: tuple[Path, object], studies: Path) -> None:
    out, _ = evaluated
    slices = [r for r in _rows(out / "slices.csv") if r["method"] == "drunet" and r["study"] == "study-01"]
    with np.load(out / "cases" / "study-01" / "drunet" / "mask.npz") as data:
        predicted = data["mask"]
    from worker.imaging.dicom_load import load_study
    from worker.imaging.ground_truth import load_truth_mask
    from worker.imaging.series_selection import SelectionRules

    series = load_study(studies / "study-01", rules=SelectionRules())
    table = metrics.slice_table(load_truth_mask(studies / "study-01", series), predicted)
    assert len(slices) == series.n_slices
    for k, row in enumerate(slices):
        assert float(row["dice"]) == pytest.approx(table["dice"][k], abs=1e-6)
        assert int(row["truth_pixels"]) == int(table["truth_pixels"][k])


def test_the_metrics_table_summarises_the_slice_rows(evaluated: tuple[Path, object]) -> None:
    out, _ = evaluated
    table = {(r["method"], r["level"], r["metric"]): r for r in _rows(out / "metrics.csv")}
    for method in ("drunet", "unet", "fcm", "active_contour"):
        rows = [r for r in _rows(out / "slices.csv") if r["method"] == method]
        hematoma = [float(r["dice"]) for r in rows if int(r["truth_pixels"]) > 0]
        every = [float(r["dice"]) for r in rows]
        assert float(table[(method, "slices_hematoma", "dice")]["mean"]) == pytest.approx(np.mean(hematoma), abs=1e-5)
        assert int(table[(method, "slices_hematoma", "dice")]["n"]) == len(hematoma)
        assert float(table[(method, "slices_all", "dice")]["mean"]) == pytest.approx(np.mean(every), abs=1e-5)
        assert int(table[(method, "patients_all", "dice")]["n"]) == 6
        assert int(table[(method, "patients_hematoma", "dice")]["n"]) == 5
    # The HU band finds phantom blood well: a real, not a degenerate, comparison.
    assert float(table[("drunet", "slices_hematoma", "dice")]["mean"]) > 0.6


def test_volume_agreement_rows_match_the_case_volumes(evaluated: tuple[Path, object]) -> None:
    out, _ = evaluated
    cases = _rows(out / "cases.csv")
    volumes = {r["method"]: r for r in _rows(out / "volumes.csv")}
    assert set(volumes) == {"drunet", "unet", "abc2", "abc2_truth", "fcm", "active_contour"}
    for method in ("drunet", "unet", "abc2"):
        mine = [r for r in cases if r["method"] == method]
        expected = metrics.volume_agreement(
            true_ml=[float(r["truth_ml"]) for r in mine], predicted_ml=[float(r["volume_ml"]) for r in mine]
        )
        assert float(volumes[method]["rmse_ml"]) == pytest.approx(expected.rmse_ml, rel=1e-5)
        assert float(volumes[method]["loa_high_ml"]) == pytest.approx(expected.loa_high_ml, rel=1e-5)
        assert float(volumes[method]["seconds_mean"]) > 0
    # ABC/2 needs the DR-UNet mask: it cannot be faster than DR-UNet
    assert float(volumes["abc2"]["seconds_mean"]) >= float(volumes["drunet"]["seconds_mean"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_cases"] == 6 and summary["disclaimer"].startswith("Research use only")
    assert summary["volume_agreement"]["drunet"]["n"] == 6


def test_an_existing_report_folder_is_refused(studies: Path, tmp_path: Path) -> None:
    from worker.core.errors import ConfigurationError

    (tmp_path / "old.txt").write_text("keep")
    with pytest.raises(ConfigurationError, match="not empty"):
        evaluate(studies_dir=studies, out_dir=tmp_path, drunet=HuBandSegmenter(input_size=64), methods=["drunet"])
    with pytest.raises(ConfigurationError, match="--unet-model"):
        evaluate(studies_dir=studies, out_dir=tmp_path / "new", drunet=HuBandSegmenter(input_size=64))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ichvol_evaluate_runs_the_saved_models(studies: Path, tmp_path: Path, tiny_model_path: Path) -> None:
    from tests.helpers.models import save_hu_band_model

    two = tmp_path / "two"
    two.mkdir()
    for name in ("study-00", "study-05"):
        shutil.copytree(studies / name, two / name)
    band = save_hu_band_model(tmp_path / "band.keras", input_size=64)
    out = tmp_path / "report"
    code = cli.main(
        ["evaluate", str(two), "--out", str(out), "--model", str(band), "--unet-model", str(tiny_model_path)]
    )
    assert code == 0
    for name in REPORT_FILES:
        assert (out / name).is_file(), name
    # the engine `segment` and the workers run (the default `auto`, resolved), named in the report
    details = json.loads((out / "summary.json").read_text())["details"]
    assert details["DR-UNet engine"] == details["UNet engine"] == resolve_engine("auto")
    assert {r["method"] for r in _rows(out / "cases.csv")} >= {"drunet", "unet", "abc2", "fcm", "active_contour"}
    assert cli.main(["evaluate", str(two), "--out", str(out), "--model", str(band)]) == 2  # folder not empty
