"""overlay.png: decoded back with OpenCV and checked pixel by pixel."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from worker.core.notices import DISCLAIMER
from worker.outputs.overlay import (
    CONTOUR_BGR,
    EMPTY_TILES,
    TILE_COLUMNS,
    brain_window_uint8,
    header_lines,
    select_slices,
    write_overlay_png,
)


def _read(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, f"{path} does not decode as an image"
    return image


def _red(image: np.ndarray) -> np.ndarray:
    return np.all(image == np.array(CONTOUR_BGR, dtype=np.uint8), axis=-1)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with background among their 8 neighbours: for rectangles, exactly the traced contour."""
    inner = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8), borderType=cv2.BORDER_CONSTANT)
    return (mask > 0) & (inner == 0)


def test_brain_window_maps_level_and_width() -> None:
    hu = np.array([-1000.0, 0.0, 20.0, 40.0, 80.0, 3000.0, np.nan])
    np.testing.assert_array_equal(brain_window_uint8(hu), [0, 0, 64, 128, 255, 255, 0])
    assert brain_window_uint8(hu).dtype == np.uint8
    np.testing.assert_array_equal(brain_window_uint8(np.array([0.0, 50.0, 100.0]), level=50, width=100), [0, 128, 255])


def test_header_text_states_both_volumes_and_the_disclaimer() -> None:
    assert header_lines(volume_ml=12.345, abc2_ml=9.96, any_hematoma=True) == [
        "Hematoma volume: 12.3 mL   ABC/2: 10.0 mL",
        DISCLAIMER,
    ]
    empty = header_lines(volume_ml=0.0, abc2_ml=0.0, any_hematoma=False)
    assert empty[0] == "Hematoma volume: 0.0 mL   ABC/2: 0.0 mL"
    assert "no hematoma detected" in empty[1].lower()
    assert empty[-1] == DISCLAIMER


def _head(n_slices: int, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.normal(30.0, 5.0, (n_slices, size, size)).astype(np.float32)


def test_contours_are_drawn_exactly_around_the_mask_on_the_right_tiles(tmp_path: Path) -> None:
    hu = _head(6)
    mask = np.zeros(hu.shape, dtype=np.uint8)
    mask[1, 10:30, 20:50] = 1
    mask[4, 5:15, 5:12] = 1
    mask[4, 20:40, 30:45] = 1
    path = tmp_path / "overlay.png"
    write_overlay_png(
        path, hu=hu, mask=mask, volume_ml=3.21, abc2_ml=2.5, positions_mm=[0, 5, 10, 15, 20, 25], tile_px=64
    )
    image = _read(path)
    header_px = image.shape[0] - 64  # two tiles, one row
    assert header_px > 0
    assert image.shape[1] >= 2 * 64
    tiles = [image[header_px:, 0:64], image[header_px:, 64:128]]
    for tile, slice_index in zip(tiles, [1, 4], strict=True):
        np.testing.assert_array_equal(_red(tile), _outline(mask[slice_index]))
    assert not _red(image[:header_px]).any()
    # The tile shows the brain window of its slice (grey where nothing is drawn).
    expected = brain_window_uint8(hu[1])
    untouched = ~_outline(mask[1])
    untouched[48:, :] = False  # the position label
    np.testing.assert_array_equal(tiles[0][..., 1][untouched], expected[untouched])
    # The header band holds light text on black.
    band = image[:header_px]
    assert (band.max(axis=-1) > 200).sum() > 200
    assert np.median(band) == 0


def test_a_large_stack_is_capped_and_downsized(tmp_path: Path) -> None:
    hu = _head(40, size=128)
    mask = np.zeros(hu.shape, dtype=np.uint8)
    mask[3:37, 40:80, 40:80] = 1
    indices, any_hematoma = select_slices(mask, max_tiles=24)
    assert any_hematoma
    assert len(indices) == 24
    assert indices[0] == 3 and indices[-1] == 36
    assert indices == sorted(set(indices))
    path = tmp_path / "overlay.png"
    write_overlay_png(
        path, hu=hu, mask=mask, volume_ml=50.0, abc2_ml=40.0, positions_mm=np.arange(40) * 5.0, tile_px=64
    )
    image = _read(path)
    rows = -(-24 // TILE_COLUMNS)
    header_px = image.shape[0] - rows * 64
    assert image.shape[1] == TILE_COLUMNS * 64
    assert 0 < header_px < 100
    first_tile = image[header_px : header_px + 64, 0:64]
    # The 40 x 40 square at half size: an outline of about 20 x 20 pixels.
    ys, xs = np.nonzero(_red(first_tile))
    assert 18 <= ys.max() - ys.min() <= 21
    assert 18 <= xs.max() - xs.min() <= 21


def test_empty_mask_still_writes_a_picture_of_evenly_spaced_slices(tmp_path: Path) -> None:
    hu = _head(20)
    mask = np.zeros(hu.shape, dtype=np.uint8)
    indices, any_hematoma = select_slices(mask, max_tiles=24)
    assert not any_hematoma
    assert len(indices) == EMPTY_TILES
    assert indices[0] == 0 and indices[-1] == 19
    path = tmp_path / "overlay.png"
    write_overlay_png(path, hu=hu, mask=mask, volume_ml=0.0, abc2_ml=0.0, positions_mm=range(20), tile_px=64)
    image = _read(path)
    assert not _red(image).any()
    assert image.shape[1] == EMPTY_TILES * 64
    # One more header line ("no hematoma detected") than a sheet with hematoma.
    with_blood = mask.copy()
    with_blood[2, 10:20, 10:20] = 1
    other = tmp_path / "other.png"
    write_overlay_png(other, hu=hu, mask=with_blood, volume_ml=1.0, abc2_ml=1.0, positions_mm=range(20), tile_px=64)
    other_image = _read(other)
    assert (image.shape[0] - 64) - (other_image.shape[0] - 64) == 24


def test_inconsistent_inputs_are_refused(tmp_path: Path) -> None:
    hu = _head(3)
    with pytest.raises(ValueError, match="positions"):
        write_overlay_png(
            tmp_path / "o.png", hu=hu, mask=np.zeros_like(hu), volume_ml=0, abc2_ml=0, positions_mm=[0, 1]
        )
    with pytest.raises(ValueError, match="same"):
        write_overlay_png(
            tmp_path / "o.png",
            hu=hu,
            mask=np.zeros((3, 8, 8)),
            volume_ml=0,
            abc2_ml=0,
            positions_mm=[0, 1, 2],
        )
    assert not list(tmp_path.iterdir())
