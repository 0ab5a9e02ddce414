"""The model on 8-bit slice images: calibration, inference, and the one post-processing path for images.

Research use only, not for clinical use.

Shared by ``ichvol predict-images`` and ``ichvol evaluate-images`` (and the real-slice
score that training uses to choose checkpoints), so that what is evaluated is what users
get. For each image ``(rows, columns)`` uint8:

1. levels to estimated HU (:mod:`worker.imaging.slice_calibration`; default: re-anchored on the
   brain parenchyma);
2. HU to the model input exactly as a DICOM study (:func:`worker.preprocess.to_model_input`),
   the segmenter, probabilities back to the image's size;
3. threshold (``> threshold``); with ``intracranial``, only the skull-enclosed space of the
   image (:mod:`worker.measure.image_skull`: the saturated skull ring);
4. seeded growth (:mod:`worker.measure.seeded_growth`) into the connected blood-density region,
   on the estimated HU; levels saturated at 255 count as possibly blood (the window hides
   whether they are blood or bone; the skull itself is known from the ring);
5. pieces smaller than ``min_area_mm2`` dropped (mm from the given or estimated pixel size).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import cv2
import numpy as np
import numpy.typing as npt

from worker.imaging.slice_calibration import ImageCalibration, calibrate_image
from worker.measure.image_skull import ImageSkull, image_skull
from worker.measure.seeded_growth import GrowthSettings, blood_region, grow_from_seeds
from worker.model import preprocess
from worker.model.weights import ModelInfo, Segmenter

__all__ = ["ImageOptions", "ImagePrediction", "model_input", "predict_slices"]

U8 = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class ImageOptions:
    """How images are read and post-processed (module docstring). HU, mm, probability.

    ``threshold`` None: the decision threshold calibrated for the model (its metadata)."""

    threshold: float | None = None
    calibration: str = "parenchyma"  # "parenchyma", "window" or "none"
    display_window: tuple[float, float] | None = None  # HU of levels 0 and 255, for "window"
    intracranial: bool = True
    growth: GrowthSettings = field(default_factory=GrowthSettings)
    min_area_mm2: float = 5.0
    pixel_mm: float | None = None  # the images' pixel size when known (else estimated from the head)

    def as_json(self) -> dict[str, object]:
        return {
            "threshold": self.threshold,
            "calibration": self.calibration,
            "display_window_hu": None if self.display_window is None else list(self.display_window),
            "intracranial_only": self.intracranial,
            "growth": self.growth.as_json(),
            "min_area_mm2": self.min_area_mm2,
        }

    def for_model(self, info: ModelInfo) -> ImageOptions:
        """These options with the threshold the model's own where none was asked for."""
        return replace(self, threshold=info.decision_threshold(self.threshold))


@dataclass(frozen=True)
class ImagePrediction:
    """One image's result: final mask and the model's own (uint8 0/1), probabilities, how it was read."""

    mask: U8
    model_mask: U8
    probabilities: F32
    calibration: ImageCalibration
    skull: ImageSkull | None
    hu: F32


def _drop_small(mask: U8, *, min_px: float) -> U8:
    if min_px <= 1 or not mask.any():
        return mask
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    keep = np.zeros(n, dtype=bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_px
    out: U8 = keep[labels].astype(np.uint8)
    return out


def _finish(
    image: U8, hu: F32, probabilities: F32, calibration: ImageCalibration, options: ImageOptions
) -> ImagePrediction:
    if options.threshold is None:
        raise ValueError("no threshold: resolve the model's own with ImageOptions.for_model(info) first")
    model_mask = (probabilities > options.threshold).astype(np.uint8)
    skull = image_skull(image, pixel_mm=options.pixel_mm) if options.intracranial or options.growth.enabled else None
    mask = model_mask & skull.inside if options.intracranial and skull is not None else model_mask.copy()
    if options.growth.enabled and skull is not None and mask.any():
        growth = replace(options.growth, hu_high=max(options.growth.hu_high, calibration.high_hu + 1.0))
        spacing = (skull.pixel_mm, skull.pixel_mm)
        region = blood_region(hu, inside=skull.inside, bone=skull.bone, pixel_spacing_mm=spacing, settings=growth)
        mask = grow_from_seeds(
            mask, probabilities=probabilities, region=region, pixel_spacing_mm=spacing, settings=growth
        )
    pixel_mm = skull.pixel_mm if skull is not None else options.pixel_mm
    if pixel_mm is not None:
        mask = _drop_small(mask, min_px=options.min_area_mm2 / (pixel_mm * pixel_mm))
    return ImagePrediction(mask, model_mask, probabilities, calibration, skull, hu)


def model_input(
    image: U8, *, info: ModelInfo, options: ImageOptions
) -> tuple[ImageCalibration, F32, F32, preprocess.Fit]:
    """One 8-bit slice as the model sees it: its calibration, its HU ``(rows, columns)``, the
    model input ``(1, S, S)`` in [-1, 1] and the fit back to the image grid."""
    calibration = calibrate_image(
        image, method=options.calibration, model_window=info.hu_window, display_window=options.display_window
    )
    hu = calibration.to_hu(image)
    x, fit = preprocess.to_model_input(hu[None], size=info.input_size, window=info.hu_window)
    return calibration, hu, x, fit


def predict_slices(images: list[U8], *, segmenter: Segmenter, options: ImageOptions) -> list[ImagePrediction]:
    """Segment 8-bit slices ``(rows, columns)`` of any sizes (module docstring), in one model batch."""
    if not images:
        return []
    info = segmenter.info
    options = options.for_model(info)
    inputs: list[F32] = []
    fits: list[preprocess.Fit] = []
    readings: list[tuple[ImageCalibration, F32]] = []
    for image in images:
        calibration, hu, x, fit = model_input(image, info=info, options=options)
        inputs.append(x)
        fits.append(fit)
        readings.append((calibration, hu))
    probabilities = segmenter.predict(np.concatenate(inputs))
    out: list[ImagePrediction] = []
    for image, fit, prob, (calibration, hu) in zip(images, fits, probabilities, readings, strict=True):
        native = preprocess.to_native(prob[None], fit)[0]
        out.append(_finish(image, hu, native, calibration, options))
    return out
