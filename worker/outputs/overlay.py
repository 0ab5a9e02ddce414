"""``overlay.png``: a contact sheet of the hematoma slices with the mask outlined, for a quick look.

OpenCV only (no matplotlib: it is slow to import in a worker). Inputs follow
:mod:`worker.core.ct`: ``hu`` float HU and ``mask`` (non-zero = hematoma), both
``(slices, rows, columns)`` in sorted order; ``positions_mm[i]`` is slice ``i``'s position
along the slice normal in mm.

Layout
------
* A header band (black, white text): ``"Hematoma volume: X.X mL   ABC/2: Y.Y mL"``, then
  ``"No hematoma detected."`` for an empty mask, then the research-use disclaimer.
* Below it a grid of square tiles of ``tile_px`` pixels, at most ``TILE_COLUMNS`` per row.
  Tiles show the slices that hold hematoma, in slice order; if there are more than
  ``max_tiles`` of them, ``max_tiles`` evenly spaced ones from the first to the last
  hematoma slice. With no hematoma: ``min(EMPTY_TILES, slices)`` evenly spaced slices.
* Each tile is the slice in the brain window (level 40 HU, width 80 HU), resized to fit the
  tile (aspect ratio of the pixel grid kept, black letterbox), the mask outline drawn in
  ``CONTOUR_BGR`` (pure red; greys have equal channels, so red pixels are exactly the
  outline), and the slice position (``"z 12.5 mm"``) written in the lower-left corner.

The picture is at most ``TILE_COLUMNS * tile_px`` wide (or the header text's width) and
``header + ceil(max_tiles / TILE_COLUMNS) * tile_px`` high.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from worker.core.notices import DISCLAIMER

__all__ = ["CONTOUR_BGR", "brain_window_uint8", "header_lines", "select_slices", "write_overlay_png"]

CONTOUR_BGR = (0, 0, 255)
TILE_COLUMNS = 6
EMPTY_TILES = 6
NO_HEMATOMA_TEXT = "No hematoma detected."
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_HEADER_SCALE = 0.6
_HEADER_THICKNESS = 1
_LINE_PX = 24
_MARGIN_PX = 10
_MIN_TILE_PX = 32

UInt8Array = npt.NDArray[np.uint8]


def brain_window_uint8(hu: np.ndarray, *, level: float = 40, width: float = 80) -> UInt8Array:
    """Map HU to 0..255 with a linear window: ``level - width/2`` -> 0, ``level + width/2`` -> 255.

    Any shape; values outside the window clip, NaN maps to 0. Returns uint8 of the same shape.
    """
    if not width > 0:
        raise ValueError(f"window width must be positive, got {width}")
    low = level - width / 2.0
    scaled = (np.asarray(hu, dtype=np.float32) - np.float32(low)) * np.float32(255.0 / width)
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    out: UInt8Array = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return out


def select_slices(mask: np.ndarray, *, max_tiles: int) -> tuple[list[int], bool]:
    """Indices of the slices to show, and whether any slice holds hematoma (rules: module docstring)."""
    n_slices = mask.shape[0]
    with_hematoma = np.flatnonzero(mask.reshape(n_slices, -1).any(axis=1))
    if with_hematoma.size:
        candidates, limit = with_hematoma, max_tiles
    else:
        candidates, limit = np.arange(n_slices), min(EMPTY_TILES, max_tiles)
    if candidates.size > limit:
        picks = np.unique(np.rint(np.linspace(0, candidates.size - 1, limit)).astype(int))
        candidates = candidates[picks]
    return [int(i) for i in candidates], bool(with_hematoma.size)


def _fit(rows: int, columns: int, tile_px: int) -> tuple[float, int, int]:
    """Scale and offsets (x, y) that fit a ``rows x columns`` image centred in the tile."""
    scale = tile_px / max(rows, columns)
    width, height = max(1, round(columns * scale)), max(1, round(rows * scale))
    return scale, (tile_px - width) // 2, (tile_px - height) // 2


def _tile(hu_slice: np.ndarray, mask_slice: np.ndarray, position_mm: float, tile_px: int) -> UInt8Array:
    rows, columns = hu_slice.shape
    scale, x0, y0 = _fit(rows, columns, tile_px)
    width, height = max(1, round(columns * scale)), max(1, round(rows * scale))
    grey = brain_window_uint8(hu_slice)
    if (width, height) != (columns, rows):
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        grey = np.asarray(cv2.resize(grey, (width, height), interpolation=interpolation), dtype=np.uint8)
    tile = np.zeros((tile_px, tile_px, 3), dtype=np.uint8)
    tile[y0 : y0 + height, x0 : x0 + width] = grey[:, :, None]
    binary = (np.asarray(mask_slice) != 0).astype(np.uint8)
    if binary.any():
        contours, _ = cv2.findContours(binary, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        # Pixel centres map to ((c + 0.5) * scale - 0.5): exact at scale 1, centred otherwise.
        scaled = [
            np.rint((c.astype(np.float64) + 0.5) * scale - 0.5 + np.array([x0, y0])).astype(np.int32) for c in contours
        ]
        cv2.drawContours(tile, scaled, -1, CONTOUR_BGR, thickness=1, lineType=cv2.LINE_8)
    label = f"z {position_mm:.1f} mm"
    origin = (4, tile_px - 6)
    label_scale = max(0.3, min(0.5, tile_px / 512))
    cv2.putText(tile, label, origin, _FONT, label_scale, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(tile, label, origin, _FONT, label_scale, (255, 255, 255), 1, cv2.LINE_AA)
    return tile


def header_lines(*, volume_ml: float, abc2_ml: float, any_hematoma: bool) -> list[str]:
    """The header band's text, one string per line (volumes with one decimal)."""
    lines = [f"Hematoma volume: {volume_ml:.1f} mL   ABC/2: {abc2_ml:.1f} mL"]
    if not any_hematoma:
        lines.append(NO_HEMATOMA_TEXT)
    lines.append(DISCLAIMER)
    return lines


def write_overlay_png(
    path: Path,
    *,
    hu: np.ndarray,
    mask: np.ndarray,
    volume_ml: float,
    abc2_ml: float,
    positions_mm: Sequence[float],
    max_tiles: int = 24,
    tile_px: int = 256,
) -> None:
    """Write the contact sheet described in the module docstring to ``path`` (PNG).

    ``hu``: float HU and ``mask``: non-zero = hematoma, both ``(slices, rows, columns)``;
    ``positions_mm``: ``(slices,)`` mm along the slice normal; ``volume_ml`` and
    ``abc2_ml`` are printed with one decimal.
    """
    if hu.ndim != 3 or mask.shape != hu.shape:
        raise ValueError(f"hu {hu.shape} and mask {mask.shape} must be the same (slices, rows, columns)")
    if len(positions_mm) != hu.shape[0]:
        raise ValueError(f"{len(positions_mm)} positions for {hu.shape[0]} slices")
    if hu.shape[0] == 0 or hu.shape[1] == 0 or hu.shape[2] == 0:
        raise ValueError(f"nothing to draw: hu has shape {hu.shape}")
    if max_tiles < 1 or tile_px < _MIN_TILE_PX:
        raise ValueError(f"max_tiles must be >= 1 and tile_px >= {_MIN_TILE_PX}, got {max_tiles}, {tile_px}")
    indices, any_hematoma = select_slices(mask, max_tiles=max_tiles)
    tiles = [_tile(hu[i], mask[i], float(positions_mm[i]), tile_px) for i in indices]
    columns = min(len(tiles), TILE_COLUMNS)
    grid_rows = math.ceil(len(tiles) / columns)

    lines = header_lines(volume_ml=volume_ml, abc2_ml=abc2_ml, any_hematoma=any_hematoma)
    text_width = max(cv2.getTextSize(t, _FONT, _HEADER_SCALE, _HEADER_THICKNESS)[0][0] for t in lines)
    width = max(columns * tile_px, text_width + 2 * _MARGIN_PX)
    header_px = _MARGIN_PX + _LINE_PX * len(lines)
    sheet = np.zeros((header_px + grid_rows * tile_px, width, 3), dtype=np.uint8)
    for n, text in enumerate(lines):
        baseline_y = _MARGIN_PX + _LINE_PX * n + 16
        cv2.putText(sheet, text, (_MARGIN_PX, baseline_y), _FONT, _HEADER_SCALE, (255, 255, 255), 1, cv2.LINE_AA)
    for n, tile in enumerate(tiles):
        r, c = divmod(n, columns)
        y, x = header_px + r * tile_px, c * tile_px
        sheet[y : y + tile_px, x : x + tile_px] = tile
    ok, encoded = cv2.imencode(".png", sheet, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise OSError(f"could not encode {path.name} as PNG")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encoded.tobytes())
