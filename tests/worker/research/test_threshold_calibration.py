"""Choosing a weights file's decision threshold and writing it into a copy (metadata only)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from tests.helpers.scripts import run_script
from worker.core.errors import ConfigurationError
from worker.model.weights import METADATA_MEMBER, read_model_info, sha256_of
from worker.research.threshold_calibration import ThresholdScore, choose_threshold, write_calibrated_copy


def _score(
    t: float,
    phantom: float,
    real: float | None = 0.7,
    found: int | None = 13,
    false_ml: float | None = 0.0,
    mae: float | None = 3.0,
) -> ThresholdScore:
    return ThresholdScore(
        threshold=t, phantom_dice=phantom, phantom_mae_ml=mae, real_dice=real, real_found=found, false_ml=false_ml
    )


def test_the_best_mean_of_phantom_and_real_dice_is_chosen() -> None:
    scores = [_score(0.5, 0.60, 0.70), _score(0.7, 0.62, 0.74), _score(0.9, 0.66, 0.66)]
    assert [s.selection for s in scores] == pytest.approx([0.65, 0.68, 0.66])
    assert choose_threshold(scores).threshold == 0.7
    assert choose_threshold(list(reversed(scores))).threshold == 0.7  # order of measurement does not matter


def test_ties_go_to_the_lower_threshold_and_phantoms_alone_decide_without_real_slices() -> None:
    assert choose_threshold([_score(0.8, 0.6), _score(0.6, 0.6)]).threshold == 0.6
    alone = [_score(0.5, 0.60, real=None, found=None), _score(0.7, 0.64, real=None, found=None)]
    assert alone[1].selection == 0.64
    assert choose_threshold(alone).threshold == 0.7


def test_false_volume_bleeds_lost_or_larger_volume_errors_rule_a_threshold_out() -> None:
    best_but_false = [_score(0.5, 0.60), _score(0.6, 0.70, false_ml=1.2)]
    assert choose_threshold(best_but_false).threshold == 0.5
    best_but_misses = [_score(0.5, 0.60, found=13), _score(0.9, 0.70, found=12)]
    assert choose_threshold(best_but_misses).threshold == 0.5
    best_but_worse_volumes = [_score(0.5, 0.60, mae=3.0), _score(0.9, 0.70, mae=3.2)]
    assert choose_threshold(best_but_worse_volumes).threshold == 0.5
    with pytest.raises(ConfigurationError, match="bleed-free"):
        choose_threshold([_score(0.5, 0.6, false_ml=2.0), _score(0.8, 0.7, false_ml=1.0)])
    with pytest.raises(ConfigurationError):
        choose_threshold([])


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def test_the_calibrated_copy_changes_only_the_metadata(tiny_model_path: Path, tmp_path: Path) -> None:
    scores = [_score(0.5, 0.6), _score(0.8, 0.7)]
    chosen = choose_threshold(scores)
    out = tmp_path / "cal" / "tiny-cal.keras"
    base_sha = sha256_of(tiny_model_path)
    written = write_calibrated_copy(
        tiny_model_path, out, chosen=chosen, scores=scores, measured_on={"phantoms": 2}, version="tiny-test-1.1"
    )
    assert sha256_of(tiny_model_path) == base_sha  # the base is untouched
    info = read_model_info(out)
    assert info.threshold == written.threshold == 0.8 and info.version == "tiny-test-1.1"
    assert written.sha256 == sha256_of(out) != base_sha
    record = info.provenance["threshold_calibration"]
    assert record["base_sha256"] == base_sha and record["base_version"] == "tiny-test-1"
    assert record["base_threshold"] == 0.5 and record["threshold"] == 0.8
    assert [c["threshold"] for c in record["candidates"]] == [0.5, 0.8]
    assert record["measured_on"] == {"phantoms": 2}
    base_members, new_members = _members(tiny_model_path), _members(out)
    assert base_members.keys() == new_members.keys()
    assert all(base_members[n] == new_members[n] for n in base_members if n != METADATA_MEMBER)
    kept = write_calibrated_copy(tiny_model_path, tmp_path / "b.keras", chosen=chosen, scores=scores, measured_on={})
    assert kept.version == read_model_info(tmp_path / "b.keras").version == "tiny-test-1"  # the base's by default
    with pytest.raises(ConfigurationError, match="new file"):
        write_calibrated_copy(tiny_model_path, tiny_model_path, chosen=chosen, scores=scores, measured_on={})


@pytest.mark.slow
def test_the_calibration_script_writes_a_copy_with_its_choice(tiny_model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny-cal.keras"
    result = run_script(
        "calibrate_threshold.py",
        "--model",
        str(tiny_model_path),
        "--out",
        str(out),
        "--quick",
        "--thresholds",
        "0.3,0.5,0.7",
        "--version",
        "tiny-cal",
        "--max-false-ml",
        "1e9",  # an untrained model marks the GE scan (where present): the limit is not under test here
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    info = read_model_info(out)
    assert info.version == "tiny-cal" and info.threshold in (0.3, 0.5, 0.7)
    assert "(chosen)" in result.stdout and f"threshold {info.threshold:g}" in result.stdout
    assert len(info.provenance["threshold_calibration"]["candidates"]) == 3
    same = run_script("calibrate_threshold.py", "--model", str(out), "--out", str(out), timeout=300)
    assert same.returncode == 2 and "new file" in same.stderr and "Traceback" not in same.stderr
