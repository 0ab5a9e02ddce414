"""DR-UNet (Stroke 2022) and a plain UNet baseline, in Keras 3; saving and loading.

Architecture (faithful to the paper and the authors' code):

* stem: 1x1 convolution, 16 filters, BatchNorm, ELU;
* six encoder levels with ``dims * (1, 2, 4, 8, 16, 32)`` filters, each a Block 1 then
  a Block 3, 2x2 max-pooling between levels;
* five decoder levels: 2x2 transposed convolution, concatenation with the skip,
  BatchNorm, ELU, then Block 2 and Block 3;
* 1x1 convolution with sigmoid.

The three "reduced dimensional residual convolution units" (RDRCU) share one shape:
a main branch 1x1 -> 3x3 -> 3x3 at ``C/4`` filters and a 1x1 side branch, each
convolution followed by BatchNorm (+ ELU, except the last of the main branch), the
branches added and passed through ELU. Blocks 1 and 2 stay at ``C/4`` filters; Block 3
widens the last main convolution and the side branch back to ``C``. With ``dims=32`` at
256x256x1 the model has 10,978,305 parameters, as the authors' code.

Tensors are NHWC float32; inputs are CT slices windowed to [-1, 1] (see
:mod:`worker.model.preprocess`), outputs hematoma probabilities in [0, 1].

This module reaches TensorFlow/Keras only through :mod:`worker.model.framework`.
"""

from __future__ import annotations

import logging
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from worker.core.errors import ModelFileError
from worker.model import framework
from worker.model.weights import ModelInfo, write_model_info

log = logging.getLogger(__name__)

ARCHITECTURES = ("drunet", "unet")
DISPLAY_NAMES = {"drunet": "DR-UNet", "unet": "UNet"}


def _conv_bn(x: Any, filters: int, kernel: int, *, activate: bool = True) -> Any:
    layers = framework.keras().layers
    x = layers.Conv2D(filters, kernel, padding="same")(x)
    x = layers.BatchNormalization()(x)
    return layers.ELU()(x) if activate else x


def _rdrcu(x: Any, filters: int, *, widen: bool) -> Any:
    """One reduced dimensional residual convolution unit (Block 1/2: widen=False, Block 3: True)."""
    layers = framework.keras().layers
    reduced = max(filters // 4, 1)
    out_filters = filters if widen else reduced
    main = _conv_bn(x, reduced, 1)
    main = _conv_bn(main, reduced, 3)
    main = _conv_bn(main, out_filters, 3, activate=False)
    side = _conv_bn(x, out_filters, 1, activate=False)
    return layers.ELU()(layers.Add()([main, side]))


def build_drunet(*, dims: int = 32, input_size: int = 256, levels: int = 6) -> Any:
    """The DR-UNet as a functional Keras model, input ``(input_size, input_size, 1)``."""
    keras = framework.keras()
    layers = keras.layers
    if input_size % (2 ** (levels - 1)):
        raise ValueError(f"input_size {input_size} must be divisible by {2 ** (levels - 1)}")
    inputs = keras.Input((input_size, input_size, 1), name="ct")
    x = _conv_bn(inputs, 16, 1)
    skips = []
    for level in range(levels):
        filters = dims * 2**level
        x = _rdrcu(x, filters, widen=False)  # Block 1
        x = _rdrcu(x, filters, widen=True)  # Block 3
        if level < levels - 1:
            skips.append(x)
            x = layers.MaxPooling2D(2)(x)
    for level in reversed(range(levels - 1)):
        filters = dims * 2**level
        up = layers.Conv2DTranspose(filters, 2, strides=2, padding="same")(x)
        x = layers.Concatenate()([up, skips[level]])
        x = layers.ELU()(layers.BatchNormalization()(x))
        x = _rdrcu(x, filters, widen=False)  # Block 2
        x = _rdrcu(x, filters, widen=True)  # Block 3
    outputs = layers.Conv2D(1, 1, activation="sigmoid", name="hematoma")(x)
    return keras.Model(inputs, outputs, name="drunet")


def build_unet(*, dims: int = 32, input_size: int = 256, levels: int = 5) -> Any:
    """The plain UNet baseline: two 3x3 conv + BatchNorm + ReLU per level, ``levels`` levels."""
    keras = framework.keras()
    layers = keras.layers
    if input_size % (2 ** (levels - 1)):
        raise ValueError(f"input_size {input_size} must be divisible by {2 ** (levels - 1)}")

    def double_conv(x: Any, filters: int) -> Any:
        for _ in range(2):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
            x = layers.BatchNormalization()(x)
            x = layers.ReLU()(x)
        return x

    inputs = keras.Input((input_size, input_size, 1), name="ct")
    x = inputs
    skips = []
    for level in range(levels):
        x = double_conv(x, dims * 2**level)
        if level < levels - 1:
            skips.append(x)
            x = layers.MaxPooling2D(2)(x)
    for level in reversed(range(levels - 1)):
        x = layers.Conv2DTranspose(dims * 2**level, 2, strides=2, padding="same")(x)
        x = layers.Concatenate()([x, skips[level]])
        x = double_conv(x, dims * 2**level)
    outputs = layers.Conv2D(1, 1, activation="sigmoid", name="hematoma")(x)
    return keras.Model(inputs, outputs, name="unet")


def build_model(architecture: str, *, dims: int, input_size: int) -> Any:
    if architecture == "drunet":
        return build_drunet(dims=dims, input_size=input_size)
    if architecture == "unet":
        return build_unet(dims=dims, input_size=input_size)
    raise ValueError(f"unknown architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}")


def save_model(model: Any, path: Path, info: ModelInfo, *, float16: bool = False) -> Path:
    """Save ``model`` as a ``.keras`` file with ``info`` inside.

    ``float16=True`` stores the weights at half precision (half the size; they are
    widened back to float32 on load). Writes atomically: a reader never sees half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if getattr(model, "optimizer", None) is not None:
        # Ship weights, not training state: a compiled model would carry Adam's moments (3x the size).
        clean = model.__class__.from_config(model.get_config())
        clean.set_weights(model.get_weights())
        model = clean
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        staging = Path(tmp) / "model.keras"
        model.save(staging)
        if float16:
            _store_weights_half(staging)
        write_model_info(staging, info)
        staging.replace(path)
    return path


def _store_weights_half(archive_path: Path) -> None:
    import h5py

    with tempfile.TemporaryDirectory() as tmp:
        h5_path = Path(tmp) / "model.weights.h5"
        with zipfile.ZipFile(archive_path) as archive:
            members = [(item, archive.read(item.filename)) for item in archive.infolist()]
        weights = next((data for item, data in members if item.filename == "model.weights.h5"), None)
        if weights is None:
            raise ModelFileError("saved archive has no model.weights.h5")
        h5_path.write_bytes(weights)
        with h5py.File(h5_path, "r+") as h5:
            names: list[str] = []
            h5.visit(names.append)
            for name in names:
                node = h5[name]
                if isinstance(node, h5py.Dataset) and node.dtype == np.float32:
                    data = node[()]
                    del h5[name]
                    h5.create_dataset(name, data=data.astype(np.float16))
        rewritten = h5_path.read_bytes()
        with zipfile.ZipFile(archive_path, "w", compression=zipfile.ZIP_DEFLATED) as out:
            for item, data in members:
                out.writestr(item.filename, rewritten if item.filename == "model.weights.h5" else data)


def load_keras_model(path: Path) -> Any:
    """Load the Keras model from a weights file (architecture rebuilt from the archive)."""
    keras = framework.keras()
    try:
        return keras.saving.load_model(path, compile=False)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise ModelFileError(f"cannot load model {path.name}: {exc}") from None


def norm_layers(model: Any) -> list[Any]:
    """Every BatchNormalization layer of ``model``, in layer order (from the input)."""
    keras = framework.keras()
    return [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
