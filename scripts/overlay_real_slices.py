#!/usr/bin/env python
"""Overlays of a model's hematoma masks on real 8-bit CT slices, as one small contact sheet.

Research use only, not for clinical use.

Made for the 14 slices of ``../shared/data/drunet-test-slices/`` (real hemorrhages, 1440 x
1440, already windowed 8-bit, JPEG data despite the ``.png`` names, no masks, no pixel
spacing): each image is read as 8-bit grey (the format is sniffed, never trusted from the
name), mapped to the model's [-1, 1] input with ``pixel / 127.5 - 1``, padded to a square
and resized to the model's input size exactly as a study would be, segmented, and the
mask (probability > threshold, no post-processing: there is no HU to find the skull with)
is drawn back on the image as a red contour. The sheet is downscaled for the README.

    .venv/bin/python scripts/overlay_real_slices.py                       # default model
    .venv/bin/python scripts/overlay_real_slices.py --model other.keras --out /tmp/sheet.png

Prints one line per image: the share of the head (pixels > 0) called hematoma and the
largest component's area in pixels of the 1440 grid.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IN = REPO.parent / "shared" / "data" / "drunet-test-slices"
DEFAULT_OUT = REPO / "docs" / "img" / "drunet_slices_default_model.jpg"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=DEFAULT_IN, help="folder of 8-bit slices")
    parser.add_argument("--model", type=Path, default=None, help="weights file (default: the shipped model)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="contact sheet to write (.jpg or .png)")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--columns", type=int, default=5)
    parser.add_argument("--tile", type=int, default=240, help="tile side in the sheet, pixels")
    args = parser.parse_args(argv)

    from worker.imaging.image_io import IMAGE_SUFFIXES, read_grey_uint8
    from worker.model import preprocess
    from worker.model.engines import load_segmenter

    if not args.images.is_dir():
        print(f"overlay_real_slices: {args.images} does not exist (see ../shared/data/README.md)", file=sys.stderr)
        return 2
    paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        print(f"overlay_real_slices: no images in {args.images}", file=sys.stderr)
        return 2
    segmenter = load_segmenter(args.model)
    info = segmenter.info
    tiles = []
    for path in paths:
        grey = read_grey_uint8(path, label=path.name).pixels
        x, fit = preprocess.to_model_input(grey[None].astype(np.float32), size=info.input_size, window=(0.0, 255.0))
        probs = preprocess.to_native(segmenter.predict(x), fit)[0]
        mask = (probs > args.threshold).astype(np.uint8)
        head = grey > 0
        n, _labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        largest = int(stats[1:, cv2.CC_STAT_AREA].max()) if n > 1 else 0
        share = float(mask[head].mean()) if head.any() else 0.0
        print(f"{path.name}: {100 * share:.2f} % of the head called hematoma, largest component {largest} px")
        colour = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        thickness = max(2, grey.shape[0] // 240)
        cv2.drawContours(colour, contours, -1, (0, 0, 255), thickness)
        tile = cv2.resize(colour, (args.tile, args.tile), interpolation=cv2.INTER_AREA)
        cv2.putText(tile, path.stem, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
        tiles.append(tile)
    while len(tiles) % args.columns:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.hstack(tiles[i : i + args.columns]) for i in range(0, len(tiles), args.columns)]
    sheet = np.vstack(rows)
    caption = np.zeros((22, sheet.shape[1], 3), dtype=np.uint8)
    text = f"{info.name} {info.version}: red = mask (p > {args.threshold:g}). Research use only, not for clinical use."
    cv2.putText(caption, text, (6, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    sheet = np.vstack([caption, sheet])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    jpeg = args.out.suffix.lower() in (".jpg", ".jpeg")
    cv2.imwrite(str(args.out), sheet, [cv2.IMWRITE_JPEG_QUALITY, 85] if jpeg else [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(f"wrote {args.out} ({sheet.shape[1]}x{sheet.shape[0]}, {args.out.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
