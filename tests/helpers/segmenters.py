"""Segmenters for tests: deterministic, no TensorFlow.

``HuBandSegmenter`` calls "hematoma" every pixel whose windowed intensity falls in the
acute-blood band (50-90 HU by default): on phantoms, whose blood is 50-90 HU, it finds the
lesions, so end-to-end tests can check volumes against the truth without a trained model.
``probability`` is what it gives those pixels (1.0 by default) and ``threshold`` the
decision threshold its metadata names (as a calibrated weights file's does).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from worker.model.weights import ModelInfo


class HuBandSegmenter:
    def __init__(
        self,
        *,
        input_size: int = 64,
        window: tuple[float, float] = (-20.0, 100.0),
        band_hu: tuple[float, float] = (50, 90),
        version: str = "hu-band-1",
        probability: float = 1.0,
        threshold: float = 0.5,
    ) -> None:
        self._info = ModelInfo(
            name="HU band (test)",
            architecture="hu-band",
            dims=0,
            input_size=input_size,
            hu_window=window,
            version=version,
            sha256="0" * 64,
            threshold=threshold,
        )
        self._probability = probability
        low, high = window
        self._band = tuple((b - low) / (high - low) * 2 - 1 for b in band_hu)
        self.calls = 0

    @property
    def info(self) -> ModelInfo:
        return self._info

    def predict(self, images: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        self.calls += 1
        lo, hi = self._band
        return ((images >= lo) & (images <= hi)).astype(np.float32) * np.float32(self._probability)
