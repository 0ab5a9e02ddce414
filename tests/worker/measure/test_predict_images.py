"""``ichvol predict-images``: real formats whatever the names, masks at the input's size, areas and volume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.helpers.segmenters import HuBandSegmenter
from worker import cli
from worker.core.errors import ConfigurationError
from worker.measure.image_inference import ImageOptions
from worker.measure.predict_images import predict_images
from worker.measure.seeded_growth import GrowthSettings

# The seed's path: levels span the model's window, no skull restriction, no growth.
RAW = ImageOptions(calibration="none", intracranial=False, growth=GrowthSettings(enabled=False))


def _bright_band() -> HuBandSegmenter:
    """Marks pixels of 150-255 in an 8-bit image (the window (0, 255) maps pixels to [-1, 1])."""
    return HuBandSegmenter(input_size=32, window=(0.0, 255.0), band_hu=(150.0, 255.0))


def _slice(rows: int, columns: int, *, centre: tuple[int, int], radius: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:rows, :columns]
    disc = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2
    image = np.full((rows, columns), 60, np.uint8)
    image[disc] = 220
    return image, disc


def _inputs(folder: Path) -> dict[str, np.ndarray]:
    folder.mkdir()
    a, disc_a = _slice(96, 96, centre=(40, 50), radius=14)
    b, disc_b = _slice(64, 80, centre=(30, 30), radius=10)  # not square
    c, disc_c = _slice(48, 48, centre=(24, 24), radius=8)
    cv2.imwrite(str(folder / "a.png"), a)
    ok, jpeg = cv2.imencode(".jpg", b, [cv2.IMWRITE_JPEG_QUALITY, 98])
    assert ok
    (folder / "b.png").write_bytes(jpeg.tobytes())  # JPEG data, .png name
    cv2.imwrite(str(folder / "c.bmp"), np.dstack([c] * 3))  # grey saved as colour
    (folder / "notes.txt").write_text("not an image")
    (folder / "d.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)  # a PNG signature and nothing else
    return {"a": disc_a, "b": disc_b, "c": disc_c}


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as fh:
        return {r["file"]: r for r in csv.DictReader(fh)}


def test_masks_overlays_and_areas_for_every_readable_image(tmp_path: Path) -> None:
    discs = _inputs(tmp_path / "in")
    result = predict_images(
        in_dir=tmp_path / "in", out_dir=tmp_path / "out", segmenter=_bright_band(), batch_size=2, options=RAW
    )
    rows = _rows(tmp_path / "out" / "areas.csv")
    assert {f: r["status"] for f, r in rows.items()} == {
        "a.png": "ok",
        "b.png": "ok",
        "c.bmp": "ok",
        "d.png": "failed",
        "notes.txt": "skipped",
    }
    assert rows["b.png"]["format"] == "jpeg" and rows["c.bmp"]["format"] == "bmp"
    assert "truncated" in rows["d.png"]["reason"]
    assert result.n_ok == 3 and result.n_failed == 1 and result.total_volume_ml is None
    for name, disc in discs.items():
        mask = cv2.imread(str(tmp_path / "out" / "masks" / f"{name}.png"), cv2.IMREAD_GRAYSCALE)
        assert mask.shape == disc.shape and set(np.unique(mask)) <= {0, 255}
        found = mask > 0
        dice = 2 * (found & disc).sum() / (found.sum() + disc.sum())
        assert dice > 0.85, name
        assert int(rows[f"{name}.{'bmp' if name == 'c' else 'png'}"]["hematoma_pixels"]) == int(found.sum())
        assert rows[f"{name}.{'bmp' if name == 'c' else 'png'}"]["area_mm2"] == ""  # no geometry, no area
        overlay = cv2.imread(str(tmp_path / "out" / "overlays" / f"{name}.png"))
        assert overlay.shape[1] >= disc.shape[1] and overlay.shape[0] > disc.shape[0]
        red = (overlay[..., 2] == 255) & (overlay[..., 1] == 0) & (overlay[..., 0] == 0)
        assert red.any()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["n_ok"] == 3 and summary["total_volume_ml"] is None
    assert summary["disclaimer"].startswith("Research use only")


def test_areas_and_volume_only_with_the_geometry(tmp_path: Path) -> None:
    _inputs(tmp_path / "in")
    result = predict_images(
        in_dir=tmp_path / "in",
        out_dir=tmp_path / "out",
        segmenter=_bright_band(),
        pixel_spacing_mm=(0.5, 0.4),
        slice_thickness_mm=5.0,
        options=RAW,
    )
    ok = [r for r in result.images if r.status == "ok"]
    for r in ok:
        assert r.area_mm2 == pytest.approx(r.hematoma_pixels * 0.2)
        assert r.volume_ml == pytest.approx(r.hematoma_pixels * 0.2 * 5.0 / 1000.0)
    assert result.total_volume_ml == pytest.approx(sum(r.hematoma_pixels for r in ok) * 0.2 * 5.0 / 1000.0)
    rows = _rows(tmp_path / "out" / "areas.csv")
    assert float(rows["a.png"]["area_mm2"]) == pytest.approx(ok[0].area_mm2, abs=0.01)


def test_inputs_sharing_a_name_keep_their_extension(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    image, _ = _slice(32, 32, centre=(16, 16), radius=6)
    cv2.imwrite(str(folder / "x.png"), image)
    cv2.imwrite(str(folder / "x.jpg"), image)
    predict_images(in_dir=folder, out_dir=tmp_path / "out", segmenter=_bright_band(), options=RAW)
    assert sorted(p.name for p in (tmp_path / "out" / "masks").iterdir()) == ["x.jpg.png", "x.png.png"]


def _screenshot(size: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A windowed head: saturated skull ring, brain at level 140, a bleed at 230 inside, a bright blob outside."""
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    image = np.zeros((size, size), np.uint8)
    image[r < 0.42 * size] = 255
    image[r < 0.38 * size] = 140
    bleed = np.hypot(yy - 90, xx - 80) < 14
    image[bleed] = 230
    scalp = np.hypot(yy - 8, xx - 8) < 6  # outside the skull
    image[scalp] = 230
    return image, bleed, scalp


def test_images_are_read_as_hu_and_kept_inside_the_skull_by_default(tmp_path: Path) -> None:
    """Default path: the parenchyma (level 140) reads 33 HU, blood 90 levels above reads about 75 HU."""
    folder = tmp_path / "in"
    folder.mkdir()
    image, bleed, scalp = _screenshot()
    cv2.imwrite(str(folder / "head.png"), image)
    model = HuBandSegmenter(input_size=64, window=(-20.0, 100.0), band_hu=(55.0, 80.0))
    predict_images(in_dir=folder, out_dir=tmp_path / "out", segmenter=model)
    mask = cv2.imread(str(tmp_path / "out" / "masks" / "head.png"), cv2.IMREAD_GRAYSCALE) > 0
    assert 2 * (mask & bleed).sum() / (mask.sum() + bleed.sum()) > 0.85
    assert not (mask & scalp).any()  # outside the skull ring
    rows = _rows(tmp_path / "out" / "areas.csv")
    assert rows["head.png"]["calibration"] == "parenchyma (level 140 read as 33 HU)"
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["postprocessing"]["calibration"] == "parenchyma"
    assert summary["postprocessing"]["growth"]["enabled"] is True
    # The seed's convention reads level 230 as 88 HU (calcification-like): outside the band.
    predict_images(in_dir=folder, out_dir=tmp_path / "raw", segmenter=model, options=RAW)
    raw = cv2.imread(str(tmp_path / "raw" / "masks" / "head.png"), cv2.IMREAD_GRAYSCALE) > 0
    assert (raw & bleed).sum() < 0.1 * bleed.sum()


def test_a_folder_without_images_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "readme.txt").write_text("nothing")
    with pytest.raises(ConfigurationError, match="no PNG, JPEG or BMP"):
        predict_images(in_dir=tmp_path / "in", out_dir=tmp_path / "out", segmenter=_bright_band())


def test_slice_thickness_without_spacing_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["predict-images", str(tmp_path), str(tmp_path / "out"), "--slice-thickness", "5"])
    assert code == 2 and "needs --pixel-spacing" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.timeout(600)
def test_the_fourteen_real_slices_through_the_command(
    drunet_slices: Path, tmp_path: Path, tiny_model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = cli.main(
        [
            "predict-images",
            str(drunet_slices),
            str(out),
            "--model",
            str(tiny_model_path),
            "--pixel-spacing",
            "0.18",
            "--slice-thickness",
            "5",
        ]
    )
    assert code == 0
    rows = _rows(out / "areas.csv")
    ok = [r for r in rows.values() if r["status"] == "ok"]
    assert len(ok) == 14 and {r["format"] for r in ok} == {"jpeg"}
    assert all((r["rows"], r["columns"]) == ("1440", "1440") for r in ok)
    assert [r["status"] for f, r in rows.items() if not f.endswith(".png")] == ["skipped"]  # LICENSE.md
    for r in ok:
        mask = cv2.imread(str(out / "masks" / r["output"]), cv2.IMREAD_GRAYSCALE)
        assert mask.shape == (1440, 1440)
    total = json.loads((out / "summary.json").read_text())["total_volume_ml"]
    assert total == pytest.approx(sum(float(r["volume_ml"]) for r in ok), abs=1e-2)
    assert "total volume" in capsys.readouterr().out
