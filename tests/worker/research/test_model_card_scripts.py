"""The two scripts behind the model card: held-out phantom scores and overlays on real slices.

Run as a user runs them (a subprocess of this interpreter), with the tiny untrained model
so they stay fast: the figures are meaningless, the plumbing and outputs are what is checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest

from tests.helpers.scripts import run_script as _run


@pytest.mark.slow
@pytest.mark.realdata
def test_overlay_script_draws_a_sheet_of_every_real_slice(
    drunet_slices: Path, tiny_model_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sheet.jpg"
    result = _run("overlay_real_slices.py", "--model", str(tiny_model_path), "--out", str(out), "--columns", "5")
    assert result.returncode == 0, result.stderr
    n_images = len([p for p in drunet_slices.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg")])
    per_image = [line for line in result.stdout.splitlines() if "% of the head called hematoma" in line]
    assert len(per_image) == n_images == 14
    sheet = cv2.imread(str(out))
    assert sheet is not None
    rows = -(-n_images // 5)
    assert sheet.shape[1] == 5 * 240  # five tiles of 240 px
    assert sheet.shape[0] == 22 + rows * 240  # caption strip + tile rows


def test_overlay_script_says_what_is_missing(tmp_path: Path) -> None:
    result = _run("overlay_real_slices.py", "--images", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.jpg"))
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_evaluate_script_scores_every_kind_against_the_phantom_truth(tiny_model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "scores.json"
    result = _run("evaluate_default.py", "--model", str(tiny_model_path), "--quick", "--json", str(out))
    assert result.returncode == 0, result.stderr
    scores = json.loads(out.read_text())
    kinds = {row["kind"] for row in scores["phantoms"]}
    assert kinds == {"round", "irregular", "intraventricular", "subdural", "epidural"}
    for row in scores["phantoms"]:
        assert row["true_ml"] > 0
        assert row["error_ml"] == pytest.approx(row["measured_ml"] - row["true_ml"])
        assert 0.0 <= row["dice"] <= 1.0
    assert "| kind | true volume (mL) |" in result.stdout


@pytest.mark.slow
def test_average_script_writes_the_half_and_half_model_from_a_bank(tiny_model_path: Path, tmp_path: Path) -> None:
    import numpy as np

    from worker.model.networks import load_keras_model
    from worker.model.weights import read_model_info

    info = read_model_info(tiny_model_path)
    bank = tmp_path / "bank.npz"
    rng = np.random.default_rng(0)
    size = info.input_size
    np.savez(bank, images=rng.integers(0, 256, (6, size, size), dtype=np.uint8), masks=np.zeros((6, size, size)))
    out = tmp_path / "avg.keras"
    args = [str(tiny_model_path), str(tiny_model_path), "--out", str(out), "--version", "avg-test"]
    result = _run("average_weights.py", *args, "--bank", str(bank), "--calibration-slices", "4", "--batch-size", "2")
    assert result.returncode == 0, result.stderr
    assert "Research use only" in result.stdout
    written = read_model_info(out)
    assert written.version == "avg-test"
    assert "recomputed over 2 batches" in written.training_data and "first 4 slices" in written.training_data
    # A model averaged with itself keeps its weights; only BatchNorm statistics move.
    same = [
        np.allclose(a, b)
        for a, b in zip(
            load_keras_model(tiny_model_path).get_weights(), load_keras_model(out).get_weights(), strict=True
        )
    ]
    assert same.count(False) > 0 and same.count(True) > same.count(False)
