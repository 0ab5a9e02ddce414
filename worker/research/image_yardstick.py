"""The real-image yardstick: a model on windowed 8-bit slices scored against reference masks.

Research use only, not for clinical use.

``ichvol evaluate-images IMAGES MASKS --out DIR``. ``IMAGES`` holds slice images (PNG,
JPEG or BMP by content, any size); ``MASKS`` holds one binary mask per image under the
same file name (non-zero = hemorrhage, the image's size). Images without a mask are run
and shown but not scored. Every image goes through the same path as ``ichvol
predict-images`` (:func:`worker.measure.image_inference.predict_slices`: calibration, engine,
intracranial restriction, seeded growth), so the numbers are the numbers users get.

Per slice: Dice, sensitivity (recall), precision, and **found** (Dice > 0.1: the model
marked a real part of the bleed, the convention of the project's issues); the same Dice
before seeded growth (``dice_model``) shows what growth adds. Outputs in ``DIR``:
``yardstick.csv`` (one row per image), ``yardstick.json`` (options, model, per slice, the
means), ``contact_sheet.png`` (each slice with the reference outline in green and the
model's in red).

On the project's 13 masked real slices (``../shared/data/drunet-test-slices`` and
``-masks``: made by thresholding and choosing by eye, not a radiologist's outline) this
is the one real number beside the phantom table: MODEL_CARD.md reports it for each model,
and ``ichvol train --real-images`` uses it to choose checkpoints.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from worker.core.errors import ConfigurationError
from worker.core.notices import DISCLAIMER
from worker.imaging.image_io import read_grey_uint8, sniff_format, write_png
from worker.measure.image_inference import ImageOptions, predict_slices
from worker.model.weights import Segmenter

__all__ = [
    "FOUND_DICE",
    "ReferencePair",
    "SliceScore",
    "YardstickResult",
    "evaluate_images",
    "load_reference_pairs",
    "score_pairs",
]

U8 = npt.NDArray[np.uint8]
FOUND_DICE = 0.1
_TILE = 360


@dataclass(frozen=True)
class ReferencePair:
    """One image (uint8 ``(rows, columns)``) and its reference mask (bool, same shape; ``None``: none)."""

    name: str
    image: U8
    reference: npt.NDArray[np.bool_] | None


@dataclass(frozen=True)
class SliceScore:
    name: str
    scored: bool
    dice: float | None
    dice_model: float | None
    sensitivity: float | None
    precision: float | None
    found: bool | None
    reference_px: int
    predicted_px: int
    calibration: str


@dataclass(frozen=True)
class YardstickResult:
    slices: tuple[SliceScore, ...]

    @property
    def scored(self) -> tuple[SliceScore, ...]:
        return tuple(s for s in self.slices if s.scored)

    def mean(self, name: str) -> float:
        values = [float(getattr(s, name)) for s in self.scored]
        return float(np.mean(values)) if values else float("nan")

    @property
    def n_found(self) -> int:
        return sum(1 for s in self.scored if s.found)

    def summary(self) -> dict[str, float]:
        return {
            "real_slices": float(len(self.scored)),
            "real_dice": round(self.mean("dice"), 4),
            "real_dice_model": round(self.mean("dice_model"), 4),
            "real_sensitivity": round(self.mean("sensitivity"), 4),
            "real_precision": round(self.mean("precision"), 4),
            "real_found": float(self.n_found),
        }


def _image_files(folder: Path) -> list[Path]:
    files = []
    for path in sorted(Path(folder).iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        with path.open("rb") as fh:
            if sniff_format(fh.read(32)) is not None:
                files.append(path)
    return files


def load_reference_pairs(images_dir: Path, masks_dir: Path) -> list[ReferencePair]:
    """Images of ``images_dir`` with their masks from ``masks_dir`` (same file name).

    Raises :class:`ConfigurationError` for a missing folder, no images, or a mask whose
    size differs from its image's; :class:`worker.core.errors.StudyError` for an unreadable file.
    """
    for folder in (images_dir, masks_dir):
        if not Path(folder).is_dir():
            raise ConfigurationError(f"{folder} is not a folder")
    images = _image_files(images_dir)
    if not images:
        raise ConfigurationError(f"{images_dir} holds no PNG, JPEG or BMP images")
    pairs = []
    for path in images:
        image = read_grey_uint8(path).pixels
        mask_path = Path(masks_dir) / path.name
        reference = None
        if mask_path.is_file():
            reference = read_grey_uint8(mask_path).pixels > 0
            if reference.shape != image.shape:
                raise ConfigurationError(
                    f"mask {mask_path.name} is {reference.shape[1]}x{reference.shape[0]}, "
                    f"its image {image.shape[1]}x{image.shape[0]}"
                )
        pairs.append(ReferencePair(path.name, image, reference))
    return pairs


def _ratio(numerator: int, denominator: int) -> float:
    return float(numerator) / denominator if denominator else 1.0


def score_pairs(
    pairs: Sequence[ReferencePair], *, segmenter: Segmenter, options: ImageOptions, batch_size: int = 4
) -> tuple[YardstickResult, list[U8]]:
    """Run the image path on every pair and score it; returns the scores and the final masks."""
    scores: list[SliceScore] = []
    masks: list[U8] = []
    for start in range(0, len(pairs), max(1, batch_size)):
        batch = pairs[start : start + batch_size]
        predictions = predict_slices([p.image for p in batch], segmenter=segmenter, options=options)
        for pair, prediction in zip(batch, predictions, strict=True):
            masks.append(prediction.mask)
            predicted = prediction.mask > 0
            cal = prediction.calibration
            calibration = cal.method if cal.parenchyma_level is None else f"{cal.method} {cal.parenchyma_level:.0f}"
            if pair.reference is None:
                scores.append(
                    SliceScore(pair.name, False, None, None, None, None, None, 0, int(predicted.sum()), calibration)
                )
                continue
            truth = pair.reference
            inter = int(np.logical_and(predicted, truth).sum())
            n_pred, n_true = int(predicted.sum()), int(truth.sum())
            model_only = (prediction.model_mask > 0) & (
                prediction.skull.inside > 0 if prediction.skull is not None and options.intracranial else True
            )
            inter_model = int(np.logical_and(model_only, truth).sum())
            dice = _ratio(2 * inter, n_pred + n_true)
            scores.append(
                SliceScore(
                    name=pair.name,
                    scored=True,
                    dice=round(dice, 4),
                    dice_model=round(_ratio(2 * inter_model, int(model_only.sum()) + n_true), 4),
                    sensitivity=round(_ratio(inter, n_true), 4),
                    precision=round(_ratio(inter, n_pred), 4),
                    found=dice > FOUND_DICE,
                    reference_px=n_true,
                    predicted_px=n_pred,
                    calibration=calibration,
                )
            )
    return YardstickResult(tuple(scores)), masks


def _contact_sheet(pairs: Sequence[ReferencePair], masks: Sequence[U8], result: YardstickResult, header: str) -> U8:
    tiles = []
    for pair, mask, score in zip(pairs, masks, result.slices, strict=True):
        scale = _TILE / max(pair.image.shape)
        size = (round(pair.image.shape[1] * scale), round(pair.image.shape[0] * scale))
        tile = cv2.cvtColor(cv2.resize(pair.image, size, interpolation=cv2.INTER_AREA), cv2.COLOR_GRAY2BGR)
        canvas = np.zeros((_TILE, _TILE, 3), dtype=np.uint8)
        canvas[: size[1], : size[0]] = tile
        for outline, colour in ((pair.reference, (0, 200, 0)), (mask > 0, (0, 0, 255))):
            if outline is None:
                continue
            small = cv2.resize(outline.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
            contours, _ = cv2.findContours(small, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(canvas[: size[1], : size[0]], contours, -1, colour, 1)
        text = f"{pair.name}: " + ("no reference" if not score.scored else f"Dice {score.dice:.2f}")
        cv2.putText(canvas, text, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 255, 255), 1, cv2.LINE_AA)
        tiles.append(canvas)
    columns = 4
    while len(tiles) % columns:
        tiles.append(np.zeros_like(tiles[0]))
    grid = np.vstack([np.hstack(tiles[i : i + columns]) for i in range(0, len(tiles), columns)])
    lines = [header, "green: reference mask, red: model (after post-processing)", DISCLAIMER]
    band = np.zeros((22 * len(lines) + 8, grid.shape[1], 3), dtype=np.uint8)
    for n, line in enumerate(lines):
        cv2.putText(band, line, (8, 20 + 22 * n), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (255, 255, 255), 1, cv2.LINE_AA)
    sheet: U8 = np.vstack([band, grid])
    return sheet


def evaluate_images(
    *,
    images_dir: Path,
    masks_dir: Path,
    out_dir: Path,
    segmenter: Segmenter,
    options: ImageOptions | None = None,
) -> YardstickResult:
    """Score ``segmenter`` on the reference pairs; write ``yardstick.csv``, ``.json``, ``contact_sheet.png``."""
    options = (options or ImageOptions()).for_model(segmenter.info)
    pairs = load_reference_pairs(Path(images_dir), Path(masks_dir))
    if not any(p.reference is not None for p in pairs):
        raise ConfigurationError(f"no image in {images_dir} has a mask of the same name in {masks_dir}")
    result, masks = score_pairs(pairs, segmenter=segmenter, options=options)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = segmenter.info
    summary = result.summary()
    header = (
        f"{info.name} {info.version}: mean Dice {summary['real_dice']:.3f}, found {result.n_found} of "
        f"{len(result.scored)} (Dice > {FOUND_DICE})"
    )
    write_png(out / "contact_sheet.png", _contact_sheet(pairs, masks, result, header))
    with (out / "yardstick.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(SliceScore.__dataclass_fields__))
        writer.writeheader()
        for score in result.slices:
            writer.writerow(asdict(score))
    report = {
        "disclaimer": DISCLAIMER,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "images": str(images_dir),
        "masks": str(masks_dir),
        "model": {
            "name": info.name,
            "version": info.version,
            "sha256": info.sha256,
            "engine": getattr(segmenter, "engine", "keras"),
        },
        "options": options.as_json(),
        "found_rule": f"Dice > {FOUND_DICE}",
        "summary": summary,
        "slices": [asdict(s) for s in result.slices],
    }
    (out / "yardstick.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return result
