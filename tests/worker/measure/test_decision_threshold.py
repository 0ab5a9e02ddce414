"""The decision threshold: a weights file's calibrated one unless a setting asks for another.

A segmenter that gives its band 0.7 (no seeded growth: nothing reaches 0.8) marks the
blood at threshold 0.5 and nothing at 0.8, so which threshold was used shows in the
volume; ``result.json`` says which and where it came from.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.segmenters import HuBandSegmenter
from worker.core.errors import ModelFileError
from worker.core.settings import Settings
from worker.measure.image_inference import ImageOptions, predict_slices
from worker.measure.pipeline import SegmentationOptions, final_mask, segment_study
from worker.measure.predict_images import predict_images
from worker.measure.seeded_growth import GrowthSettings
from worker.model.weights import DEFAULT_THRESHOLD, ModelInfo
from worker.synth.phantom import LesionSpec, PhantomSpec, generate_study


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("threshold") / "study"
    spec = PhantomSpec(
        rows=128, columns=128, pixel_spacing_mm=(1.6, 1.6), n_slices=12, lesions=(LesionSpec("round", volume_ml=12.0),)
    )
    generate_study(root, spec=spec, seed=404)
    return root


def _measure(study: Path, out: Path, *, model_threshold: float, option: float | None) -> dict:  # type: ignore[type-arg]
    segmenter = HuBandSegmenter(probability=0.7, threshold=model_threshold)
    outcome = segment_study(
        study_dir=study,
        out_dir=out,
        segmenter=segmenter,
        options=SegmentationOptions(threshold=option),  # type: ignore[arg-type]
    )
    assert outcome.ok, outcome.result
    return outcome.result


def test_the_model_threshold_is_used_unless_a_setting_names_one(study: Path, tmp_path: Path) -> None:
    plain = _measure(study, tmp_path / "a", model_threshold=0.5, option=None)
    strict = _measure(study, tmp_path / "b", model_threshold=0.8, option=None)
    overridden = _measure(study, tmp_path / "c", model_threshold=0.8, option=0.5)
    assert plain["volume_ml"] > 5.0  # the 12 mL bleed, found at 0.5
    assert strict["volume_ml"] == 0.0  # 0.7 < the model's 0.8
    assert overridden["volume_ml"] == plain["volume_ml"]
    assert (plain["postprocessing"]["threshold"], plain["postprocessing"]["threshold_source"]) == (0.5, "model")
    assert (strict["postprocessing"]["threshold"], strict["postprocessing"]["threshold_source"]) == (0.8, "model")
    assert (overridden["postprocessing"]["threshold"], overridden["postprocessing"]["threshold_source"]) == (
        0.5,
        "setting",
    )
    on_disk = json.loads((tmp_path / "b" / "result.json").read_text())
    assert on_disk["postprocessing"]["threshold"] == 0.8


def test_final_mask_refuses_an_unresolved_threshold(study: Path) -> None:
    from worker.imaging.dicom_load import load_study

    series = load_study(study, rules=SegmentationOptions().rules)
    probabilities = np.full(series.hu.shape, 0.7, np.float32)
    with pytest.raises(ValueError, match="for_model"):
        final_mask(probabilities, series, SegmentationOptions())
    info = HuBandSegmenter(threshold=0.8).info
    assert SegmentationOptions().for_model(info).threshold == 0.8
    assert SegmentationOptions(threshold=0.3).for_model(info).threshold == 0.3


def test_images_use_the_model_threshold_too(tmp_path: Path) -> None:
    image = np.full((48, 48), 60, np.uint8)
    image[14:34, 14:34] = 220
    raw = ImageOptions(calibration="none", intracranial=False, growth=GrowthSettings(enabled=False))

    def band(threshold: float) -> HuBandSegmenter:
        return HuBandSegmenter(
            input_size=32, window=(0.0, 255.0), band_hu=(150.0, 255.0), probability=0.7, threshold=threshold
        )

    assert predict_slices([image], segmenter=band(0.5), options=raw)[0].mask.sum() > 300  # type: ignore[arg-type]
    assert predict_slices([image], segmenter=band(0.8), options=raw)[0].mask.sum() == 0  # type: ignore[arg-type]
    from dataclasses import replace

    assert predict_slices([image], segmenter=band(0.8), options=replace(raw, threshold=0.6))[0].mask.sum() > 300  # type: ignore[arg-type]
    folder = tmp_path / "in"
    folder.mkdir()
    import cv2

    cv2.imwrite(str(folder / "a.png"), image)
    predict_images(in_dir=folder, out_dir=tmp_path / "out", segmenter=band(0.8), options=raw)  # type: ignore[arg-type]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["threshold"] == 0.8 and summary["postprocessing"]["threshold"] == 0.8
    predict_images(in_dir=folder, out_dir=tmp_path / "own", segmenter=band(0.8), options=replace(raw, threshold=0.6))  # type: ignore[arg-type]
    assert json.loads((tmp_path / "own" / "summary.json").read_text())["threshold"] == 0.6  # the options' own


def test_metadata_threshold_defaults_to_one_half_and_must_be_a_probability() -> None:
    base = HuBandSegmenter().info.to_json()
    assert "threshold" in base
    legacy = {k: v for k, v in base.items() if k != "threshold"}  # files written before calibration
    assert ModelInfo.from_json(legacy).threshold == DEFAULT_THRESHOLD == 0.5
    assert ModelInfo.from_json({**base, "threshold": 0.8}).threshold == 0.8
    for bad in (0.0, 1.0, 1.5, "high"):
        with pytest.raises(ModelFileError, match="malformed"):
            ModelInfo.from_json({**base, "threshold": bad})


def test_an_empty_threshold_setting_means_the_model_own() -> None:
    assert Settings.from_env({}).threshold is None
    assert Settings.from_env({"ICHVOL_THRESHOLD": ""}).threshold is None
    assert Settings.from_env({"ICHVOL_THRESHOLD": "0.65"}).threshold == 0.65
    assert SegmentationOptions.from_settings(Settings.from_env({})).threshold is None
