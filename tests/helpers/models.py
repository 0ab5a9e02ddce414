"""Keras models for tests that a real worker process can load from a ``.keras`` file."""

from __future__ import annotations

from pathlib import Path

from worker.model.weights import ModelInfo


def save_hu_band_model(
    path: Path,
    *,
    input_size: int = 64,
    window: tuple[float, float] = (-20.0, 100.0),
    band_hu: tuple[float, float] = (48.0, 95.0),
    version: str = "hu-band-keras-1",
) -> Path:
    """A two-convolution model that marks pixels within ``band_hu`` (acute blood on phantoms).

    ``sigmoid(k (x - lo)) * sigmoid(k (hi - x))`` on the windowed input: a deterministic
    stand-in for a trained model, so end-to-end tests can compare volumes with the truth.
    """
    from worker.model import framework
    from worker.model.networks import save_model

    keras = framework.keras()
    low, high = window
    lo, hi = ((b - low) / (high - low) * 2 - 1 for b in band_hu)
    k = 400.0
    init = keras.initializers.Constant
    inputs = keras.Input((input_size, input_size, 1), name="ct")
    above = keras.layers.Conv2D(1, 1, activation="sigmoid", kernel_initializer=init(k), bias_initializer=init(-k * lo))(
        inputs
    )
    below = keras.layers.Conv2D(1, 1, activation="sigmoid", kernel_initializer=init(-k), bias_initializer=init(k * hi))(
        inputs
    )
    model = keras.Model(inputs, keras.layers.Multiply(name="hematoma")([above, below]))
    info = ModelInfo(
        name="HU band (test)",
        architecture="hu-band",
        dims=0,
        input_size=input_size,
        hu_window=window,
        version=version,
        training_data="none: a fixed HU band for tests",
    )
    return save_model(model, path, info)
