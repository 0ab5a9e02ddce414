"""``ichvol predict-images IN_DIR OUT_DIR``: the model on already-windowed 8-bit slice images.

Research use only, not for clinical use.

The seed's other entry point. Every regular file directly in ``IN_DIR`` (sorted by name)
whose first bytes say PNG, JPEG or BMP is a slice (:mod:`worker.imaging.image_io`: the extension
is not trusted, colour is turned to grey, any size); other files are listed as skipped.
Each slice goes through :func:`worker.measure.image_inference.predict_slices`, the one path for
images: its grey levels become estimated HU (by default re-anchored on the brain
parenchyma, :mod:`worker.imaging.slice_calibration`; ``--display-window LOW HIGH`` when the export
window is known; ``--calibration none`` for the seed's convention, levels spanning the
model's own window), the HU map to the model input as a DICOM study's do, the
probabilities go back to the image's own size and are thresholded (``> threshold``),
restricted to the skull-enclosed space found from the saturated skull ring, grown from
confident seeds into the connected blood-density region (:mod:`worker.measure.seeded_growth`),
and pieces under 5 mm^2 are dropped.

Outputs in ``OUT_DIR``:

* ``masks/<name>.png``: the binary mask (0/255), the input's size;
* ``overlays/<name>.png``: the slice with the mask outlined in red, a header with the file
  name, the hematoma area and the disclaimer;
* ``areas.csv``: one row per file: status (``ok``, ``failed`` or ``skipped``), the real
  format, the size, the hematoma pixel count, and, only when ``--pixel-spacing`` is given,
  the area in mm^2; with ``--slice-thickness`` too, each slice's volume in mL
  (area x thickness);
* ``summary.json``: the model, the options, the counts, and the total volume
  (sum of the slices' volumes) when both geometry options are given. That total assumes
  the images are the consecutive, non-overlapping slices of one scan and that the pixel
  spacing is the spacing of these images' pixels (after any resizing of the export).

``<name>`` is the input's file name without its extension (with it, where two inputs
share a stem). Unreadable or corrupt images are reported (``failed``) and the others
still processed; the command then exits with 2.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

import worker
from worker.core.errors import ConfigurationError, StudyError
from worker.core.notices import DISCLAIMER
from worker.imaging.image_io import GreyImage, read_grey_uint8, sniff_format, write_png
from worker.measure.image_inference import ImageOptions, ImagePrediction, predict_slices
from worker.model.weights import Segmenter

__all__ = [
    "ImageResult",
    "PredictImagesResult",
    "predict_images",
]

CONTOUR_BGR = (0, 0, 255)


@dataclass(frozen=True)
class ImageResult:
    """What happened to one input file."""

    file: str
    status: str  # "ok", "failed" or "skipped"
    reason: str = ""
    format: str = ""
    rows: int = 0
    columns: int = 0
    hematoma_pixels: int = 0
    area_mm2: float | None = None
    volume_ml: float | None = None
    output_name: str = ""
    calibration: str = ""  # how levels became HU, e.g. "parenchyma (level 147)"


@dataclass(frozen=True)
class PredictImagesResult:
    out_dir: Path
    images: tuple[ImageResult, ...]
    total_volume_ml: float | None

    @property
    def n_failed(self) -> int:
        return sum(1 for r in self.images if r.status == "failed")

    @property
    def n_ok(self) -> int:
        return sum(1 for r in self.images if r.status == "ok")


def _output_names(paths: Sequence[Path]) -> dict[Path, str]:
    stems: dict[str, int] = {}
    for p in paths:
        stems[p.stem] = stems.get(p.stem, 0) + 1
    return {p: p.stem if stems[p.stem] == 1 else p.name for p in paths}


def _list_inputs(in_dir: Path) -> tuple[list[Path], list[ImageResult]]:
    if not in_dir.is_dir():
        raise ConfigurationError(f"{in_dir} is not a folder")
    images: list[Path] = []
    skipped: list[ImageResult] = []
    for path in sorted(in_dir.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        try:
            with path.open("rb") as fh:
                head = fh.read(32)
        except OSError as exc:
            skipped.append(ImageResult(path.name, "failed", f"cannot be read ({exc.strerror or exc})"))
            continue
        if sniff_format(head) is None:
            skipped.append(ImageResult(path.name, "skipped", "not a PNG, JPEG or BMP image"))
        else:
            images.append(path)
    return images, skipped


def _overlay(image: npt.NDArray[np.uint8], mask: npt.NDArray[np.uint8], lines: Sequence[str]) -> np.ndarray:
    tile = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    contours, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    thickness = max(1, round(max(image.shape) / 512))
    cv2.drawContours(tile, contours, -1, CONTOUR_BGR, thickness=thickness)
    scale = max(0.45, max(image.shape) / 1400)
    line_px = int(26 * scale) + 6
    width = max(tile.shape[1], max(cv2.getTextSize(t, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] for t in lines) + 16)
    sheet = np.zeros((tile.shape[0] + line_px * len(lines) + 10, width, 3), dtype=np.uint8)
    for n, text in enumerate(lines):
        baseline = line_px * (n + 1)
        cv2.putText(sheet, text, (8, baseline), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    sheet[line_px * len(lines) + 10 :, : tile.shape[1]] = tile
    return sheet


def _batches(items: Sequence[Path], size: int) -> Iterable[Sequence[Path]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def predict_images(
    *,
    in_dir: Path,
    out_dir: Path,
    segmenter: Segmenter,
    threshold: float | None = None,
    batch_size: int = 8,
    pixel_spacing_mm: tuple[float, float] | None = None,
    slice_thickness_mm: float | None = None,
    progress: bool = False,
    options: ImageOptions | None = None,
) -> PredictImagesResult:
    """Segment every slice image in ``in_dir``; write masks, overlays, ``areas.csv``, ``summary.json``.

    ``pixel_spacing_mm`` is (between rows, between columns) of these images' pixels;
    areas in mm^2 need it, volumes need ``slice_thickness_mm`` too (module docstring).
    ``options``: calibration and post-processing (default :class:`ImageOptions`);
    ``threshold``, where given, replaces theirs; where neither names one, the threshold
    calibrated for the model is used.
    """
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ConfigurationError(f"threshold must lie in [0, 1], got {threshold}")
    options = options or ImageOptions()
    if threshold is not None:
        options = replace(options, threshold=threshold)
    options = options.for_model(segmenter.info)
    if pixel_spacing_mm is not None and options.pixel_mm is None:
        options = replace(options, pixel_mm=math.sqrt(float(pixel_spacing_mm[0]) * float(pixel_spacing_mm[1])))
    if pixel_spacing_mm is not None and not all(math.isfinite(v) and v > 0 for v in pixel_spacing_mm):
        raise ConfigurationError(f"pixel spacing must be positive, got {pixel_spacing_mm}")
    if slice_thickness_mm is not None and not (math.isfinite(slice_thickness_mm) and slice_thickness_mm > 0):
        raise ConfigurationError(f"slice thickness must be positive, got {slice_thickness_mm}")
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    paths, listed = _list_inputs(in_dir)
    if not paths:
        raise ConfigurationError(f"{in_dir} holds no PNG, JPEG or BMP images")
    names = _output_names(paths)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    (out_dir / "overlays").mkdir(parents=True, exist_ok=True)
    pixel_mm2 = None if pixel_spacing_mm is None else float(pixel_spacing_mm[0]) * float(pixel_spacing_mm[1])
    results: list[ImageResult] = list(listed)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(paths), desc="predicting", unit="image", dynamic_ncols=True)
    for batch in _batches(paths, max(1, batch_size)):
        loaded: list[tuple[Path, GreyImage]] = []
        for path in batch:
            try:
                loaded.append((path, read_grey_uint8(path)))
            except StudyError as error:
                reason = error.message.removeprefix(f"{path.name}: ")
                results.append(ImageResult(path.name, "failed", f"{reason} [{error.code.value}]"))
        if loaded:
            predictions = predict_slices([image.pixels for _, image in loaded], segmenter=segmenter, options=options)
            for (path, image), prediction in zip(loaded, predictions, strict=True):
                result = _write_outputs(
                    path, image, prediction.mask, names[path], out_dir, pixel_mm2, slice_thickness_mm
                )
                results.append(replace(result, calibration=_calibration_text(prediction)))
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    order = {p.name: i for i, p in enumerate(sorted(in_dir.iterdir()))}
    results.sort(key=lambda r: order.get(r.file, 0))
    ok = [r for r in results if r.status == "ok"]
    total = (
        float(sum(r.volume_ml or 0.0 for r in ok)) if pixel_mm2 is not None and slice_thickness_mm is not None else None
    )
    _write_csv(out_dir / "areas.csv", results)
    summary = {
        "disclaimer": DISCLAIMER,
        "ichvol_version": worker.__version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {
            "name": segmenter.info.name,
            "version": segmenter.info.version,
            "sha256": segmenter.info.sha256,
            "input_size": segmenter.info.input_size,
            "trained_hu_window": list(segmenter.info.hu_window),
            "engine": getattr(segmenter, "engine", "keras"),
        },
        "threshold": options.threshold,
        "postprocessing": options.as_json(),
        "pixel_spacing_mm": list(pixel_spacing_mm) if pixel_spacing_mm is not None else None,
        "slice_thickness_mm": slice_thickness_mm,
        "n_images": len(paths),
        "n_ok": len(ok),
        "n_failed": sum(1 for r in results if r.status == "failed"),
        "n_skipped": sum(1 for r in results if r.status == "skipped"),
        "total_volume_ml": None if total is None else round(total, 3),
        "volume_assumption": "images are consecutive, non-overlapping slices of one scan"
        if total is not None
        else None,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return PredictImagesResult(out_dir=out_dir, images=tuple(results), total_volume_ml=total)


def _calibration_text(prediction: ImagePrediction) -> str:
    cal = prediction.calibration
    if cal.method == "parenchyma" and cal.parenchyma_level is not None:
        return f"parenchyma (level {cal.parenchyma_level:.0f} read as 33 HU)"
    return cal.method + (f": {cal.note}" if cal.note else "")


def _write_outputs(
    path: Path,
    image: GreyImage,
    mask: npt.NDArray[np.uint8],
    name: str,
    out_dir: Path,
    pixel_mm2: float | None,
    slice_thickness_mm: float | None,
) -> ImageResult:
    pixels = int(np.count_nonzero(mask))
    area = None if pixel_mm2 is None else pixels * pixel_mm2
    volume = None if area is None or slice_thickness_mm is None else area * slice_thickness_mm / 1000.0
    write_png(out_dir / "masks" / f"{name}.png", mask * np.uint8(255))
    measure = f"{pixels} hematoma pixels" if area is None else f"hematoma area {area:.1f} mm2"
    if volume is not None:
        measure += f", {volume:.2f} mL at {slice_thickness_mm:g} mm"
    lines = [f"{path.name} ({image.format.upper()}): {measure}", DISCLAIMER]
    write_png(out_dir / "overlays" / f"{name}.png", _overlay(image.pixels, mask, lines))
    rows, columns = image.pixels.shape
    return ImageResult(
        file=path.name,
        status="ok",
        format=image.format,
        rows=rows,
        columns=columns,
        hematoma_pixels=pixels,
        area_mm2=area,
        volume_ml=volume,
        output_name=f"{name}.png",
    )


def _write_csv(path: Path, results: Sequence[ImageResult]) -> None:
    def number(value: float | None, digits: int) -> str:
        return "" if value is None else f"{value:.{digits}f}"

    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            [
                "file",
                "status",
                "reason",
                "format",
                "rows",
                "columns",
                "hematoma_pixels",
                "area_mm2",
                "volume_ml",
                "output",
                "calibration",
            ]
        )
        for r in results:
            writer.writerow(
                [
                    r.file,
                    r.status,
                    r.reason,
                    r.format,
                    r.rows or "",
                    r.columns or "",
                    r.hematoma_pixels if r.status == "ok" else "",
                    number(r.area_mm2, 2),
                    number(r.volume_ml, 4),
                    r.output_name,
                    r.calibration,
                ]
            )
