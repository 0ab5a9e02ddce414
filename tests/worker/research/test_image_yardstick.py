"""The real-image yardstick: per-slice Dice, sensitivity, precision, found/missed, sheet and reports."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.helpers.segmenters import HuBandSegmenter
from worker.core.errors import ConfigurationError
from worker.measure.image_inference import ImageOptions
from worker.measure.seeded_growth import GrowthSettings
from worker.research.image_yardstick import FOUND_DICE, evaluate_images, load_reference_pairs


def _head(size: int, blood_centre: tuple[int, int], blood_radius: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    image = np.zeros((size, size), np.uint8)
    image[r < 0.42 * size] = 255
    image[r < 0.38 * size] = 140
    blood = np.hypot(yy - blood_centre[0], xx - blood_centre[1]) < blood_radius
    image[blood] = 230
    return image, blood


def _folders(tmp_path: Path) -> tuple[Path, Path, dict[str, np.ndarray]]:
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    truth = {}
    for name, centre, radius in (("a.png", (80, 80), 15), ("b.png", (110, 90), 10), ("c.png", (90, 120), 12)):
        image, blood = _head(200, centre, radius)
        cv2.imwrite(str(images / name), image)
        truth[name] = blood
    # a: the reference is the bleed; b: the reference is somewhere else (a miss); c: no reference
    cv2.imwrite(str(masks / "a.png"), truth["a.png"].astype(np.uint8) * 255)
    elsewhere = np.zeros((200, 200), np.uint8)
    elsewhere[60:70, 120:130] = 255
    cv2.imwrite(str(masks / "b.png"), elsewhere)
    return images, masks, truth


def test_scores_found_and_missed_slices_and_writes_the_reports(tmp_path: Path) -> None:
    images, masks, _truth = _folders(tmp_path)
    model = HuBandSegmenter(input_size=64, window=(-20.0, 100.0), band_hu=(55.0, 80.0))
    result = evaluate_images(images_dir=images, masks_dir=masks, out_dir=tmp_path / "out", segmenter=model)
    by_name = {s.name: s for s in result.slices}
    assert [s.name for s in result.scored] == ["a.png", "b.png"]
    a, b, c = by_name["a.png"], by_name["b.png"], by_name["c.png"]
    assert a.found and a.dice is not None and a.dice > 0.85
    assert a.sensitivity is not None and a.sensitivity > 0.85 and a.precision is not None and a.precision > 0.85
    assert not b.found and b.dice == 0.0 and b.sensitivity == 0.0 and b.precision == 0.0
    assert not c.scored and c.dice is None and c.predicted_px > 0
    assert result.n_found == 1
    assert result.summary()["real_dice"] == pytest.approx((a.dice + 0.0) / 2, abs=1e-4)
    report = json.loads((tmp_path / "out" / "yardstick.json").read_text())
    assert report["found_rule"] == f"Dice > {FOUND_DICE}"
    assert report["summary"]["real_found"] == 1 and report["disclaimer"].startswith("Research use only")
    with (tmp_path / "out" / "yardstick.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["name"] for r in rows] == ["a.png", "b.png", "c.png"] and rows[0]["found"] == "True"
    sheet = cv2.imread(str(tmp_path / "out" / "contact_sheet.png"))
    green = (sheet[..., 1] == 200) & (sheet[..., 0] == 0) & (sheet[..., 2] == 0)
    red = (sheet[..., 2] == 255) & (sheet[..., 1] == 0) & (sheet[..., 0] == 0)
    assert green.any() and red.any()


def test_growth_completes_a_core_and_shows_in_the_model_only_dice(tmp_path: Path) -> None:
    """A model that marks only the densest core (> 78 HU): growth fills the bleed; dice_model shows the core."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    image, blood = _head(200, (90, 90), 25)
    yy, xx = np.mgrid[:200, :200]
    image[np.hypot(yy - 90, xx - 90) < 8] = 240  # a denser core
    cv2.imwrite(str(images / "x.png"), image)
    cv2.imwrite(str(masks / "x.png"), blood.astype(np.uint8) * 255)
    core_only = HuBandSegmenter(input_size=64, window=(-20.0, 100.0), band_hu=(78.0, 100.0))
    grown = evaluate_images(images_dir=images, masks_dir=masks, out_dir=tmp_path / "g", segmenter=core_only)
    plain = evaluate_images(
        images_dir=images,
        masks_dir=masks,
        out_dir=tmp_path / "p",
        segmenter=core_only,
        options=ImageOptions(growth=GrowthSettings(enabled=False)),
    )
    assert plain.slices[0].dice is not None and plain.slices[0].dice < 0.4
    assert grown.slices[0].dice is not None and grown.slices[0].dice > 0.85
    assert grown.slices[0].dice_model == pytest.approx(plain.slices[0].dice, abs=0.02)


def test_mismatched_or_missing_masks_are_refused(tmp_path: Path) -> None:
    images, masks, _ = _folders(tmp_path)
    cv2.imwrite(str(masks / "a.png"), np.zeros((100, 100), np.uint8))
    with pytest.raises(ConfigurationError, match=r"mask a\.png is 100x100"):
        load_reference_pairs(images, masks)
    empty = tmp_path / "none"
    empty.mkdir()
    model = HuBandSegmenter(input_size=64)
    with pytest.raises(ConfigurationError, match="has a mask of the same name"):
        evaluate_images(images_dir=images, masks_dir=empty, out_dir=tmp_path / "o", segmenter=model)


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.timeout(600)
def test_the_shipped_model_on_the_thirteen_masked_real_slices(
    drunet_slices: Path, drunet_slice_masks: Path, tmp_path: Path
) -> None:
    """The standing real-image number of MODEL_CARD.md (bars below the measured figures)."""
    from worker.model.engines import load_segmenter

    segmenter = load_segmenter(None, engine="folded")
    result = evaluate_images(
        images_dir=drunet_slices, masks_dir=drunet_slice_masks, out_dir=tmp_path / "out", segmenter=segmenter
    )
    assert len(result.scored) == 13 and len(result.slices) == 14
    summary = result.summary()
    assert summary["real_dice"] >= 0.65
    assert result.n_found >= 12
    seed_path = evaluate_images(
        images_dir=drunet_slices,
        masks_dir=drunet_slice_masks,
        out_dir=tmp_path / "seed",
        segmenter=segmenter,
        options=ImageOptions(calibration="none", intracranial=False, growth=GrowthSettings(enabled=False)),
    )
    assert seed_path.summary()["real_dice"] < summary["real_dice"] - 0.3


def test_the_command_scores_writes_and_prints_one_line_per_slice(
    tmp_path: Path, tiny_model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from worker import cli

    images, masks, _ = _folders(tmp_path)
    code = cli.main(
        ["evaluate-images", str(images), str(masks), "--out", str(tmp_path / "out"), "--model", str(tiny_model_path)]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "a.png: Dice" in out and "c.png: no reference mask" in out and "found" in out
    report = json.loads((tmp_path / "out" / "yardstick.json").read_text())
    from worker.core.settings import Settings
    from worker.model.engines import resolve_engine

    # the engine users get from the same settings (auto resolves per CPU: folded, folded-bf16 or onnx)
    expected_engine = resolve_engine(Settings.from_env().inference_engine)
    assert report["model"]["version"] == "tiny-test-1" and report["model"]["engine"] == expected_engine
    assert report["options"]["calibration"] == "parenchyma"
    code = cli.main(
        ["evaluate-images", str(images), str(masks), "--out", str(tmp_path / "o2"), "--calibration", "window"]
    )
    assert code == 2 and "needs --display-window" in capsys.readouterr().err
