"""The BLAST-CT network (Monteiro et al., Lancet Digital Health 2020) in Keras 3, and its weights.

A DeepMedic-style 3-D CNN, rewritten here from the architecture of ``biomedia-mira/blast-ct``
(Apache-2.0; see ``worker/weights/blast_ct/NOTICE``):

* three pathways see the same 110^3 input patch at scale factors 5, 3 and 1 (two subsampled
  pathways and the normal one). Each crops the centre of the patch it needs (110, 78 and 46
  voxels), subsamples it by taking every ``s``-th voxel starting at ``s // 2``, runs eight
  pre-activation blocks, then repeats each voxel ``s`` times along every axis (nearest
  upsampling) and crops the centre 30^3;
* a pre-activation block is BatchNorm -> PReLU (one shared slope) -> 3x3x3 valid convolution
  without bias, plus the input cropped by one voxel on each side when the channel counts
  match (a residual connection); feature maps 30, 30, 40, 40, 40, 40, 50, 50;
* the three 50-channel outputs are concatenated (scale 5, 3, 1 in that order) and pass three
  more pre-activation blocks with 1x1x1 convolutions: 150 -> 250 -> 250 (residual) -> 5;
* the output is 5 logits per voxel on the central 30^3 of the input: background, IPH, EAH,
  oedema, IVH (:data:`CLASSES`). :func:`build_blast_ct` ends in a softmax (probabilities);
  dropout (training only in their code) is left out.

Tensors are NDHWC float32 (batch, z, y, x, channel) on a 1 mm isotropic grid with intensities
windowed to [-15, 100] HU and scaled to [-1, 1] (:mod:`worker.measure.teacher`).

Weights are an ``.npz`` of named arrays (PyTorch state-dict names, Keras layout), written by
``scripts/convert_blast_ct.py``; the shipped ones are checked against their SHA-256 before use.

This module reaches TensorFlow/Keras only through :mod:`worker.model.framework`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from worker.core.errors import ModelFileError
from worker.model import framework
from worker.model.weights import sha256_of

CLASSES = ("background", "IPH", "EAH", "oedema", "IVH")
SCALE_FACTORS = (5, 3, 1)
FEATURE_MAPS = (30, 30, 40, 40, 40, 40, 50, 50)
FULLY_CONNECTED = (250, 250)
INPUT_SIZE = 110
OUTPUT_SIZE = 30
BN_EPSILON = 1e-5  # PyTorch's BatchNorm default

BLAST_CT_WEIGHTS_DIR = Path(__file__).parents[1] / "weights" / "blast_ct"
MANIFEST_NAME = "manifest.json"


def path_input_size(scale: int, output_size: int = OUTPUT_SIZE, n_blocks: int = len(FEATURE_MAPS)) -> int:
    """The patch edge a pathway crops from the input to give ``output_size`` voxels (their sizes rule)."""
    coarse = output_size // scale + bool(output_size % scale)
    return (coarse + 2 * n_blocks) * scale


def output_size_for(input_size: int) -> int:
    """The output edge for an input edge (set by the coarsest pathway, as in their code)."""
    scale = SCALE_FACTORS[0]
    coarse = (input_size - scale) // scale + 1 - 2 * len(FEATURE_MAPS)
    if coarse <= 0:
        raise ValueError(f"input edge {input_size} is too small for the network")
    return coarse * scale


def _crop_center(x: Any, size: int) -> Any:
    """The centre ``size``^3 of an NDHWC tensor, with their rounding (start c//2 - s//2)."""
    c = int(x.shape[1])
    if c == size:
        return x
    start = c // 2 - size // 2
    return x[:, start : start + size, start : start + size, start : start + size, :]


def _scaled(n: int, width: float) -> int:
    return max(1, round(n * width))


def _preact_block(x: Any, filters: int, kernel: int, name: str) -> Any:
    layers = framework.keras().layers
    out = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}.bn")(x)
    out = layers.PReLU(shared_axes=[1, 2, 3, 4], name=f"{name}.prelu")(out)
    out = layers.Conv3D(filters, kernel, padding="valid", use_bias=False, name=f"{name}.conv")(out)
    if int(x.shape[-1]) == filters:
        k = kernel // 2
        shortcut = x if k == 0 else x[:, k:-k, k:-k, k:-k, :]
        out = layers.Add(name=f"{name}.add")([out, shortcut])
    return out


def build_blast_ct(width: float = 1.0, input_size: int = INPUT_SIZE, *, dtype: str = "float32") -> Any:
    """The BLAST-CT network as a ``keras.Model``: ``(n, S, S, S, 1)`` -> ``(n, O, O, O, 5)`` probabilities.

    ``width`` scales every feature map (1.0: the published 30..50 and 250; tests build tiny
    ones). ``input_size`` S is the patch edge (110 in their inference, giving O = 30; any
    edge whose coarse pathway fits works, e.g. 85 -> 5, the smallest). Layer names are the PyTorch
    state-dict prefixes (``path0.1.bn`` ...) so weights load by name. ``dtype``: ``"float32"``
    or ``"bfloat16"`` (Keras' ``mixed_bfloat16`` policy: float32 weights, bfloat16 compute,
    float32 softmax).
    """
    keras = framework.keras()
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16" if dtype == "bfloat16" else "float32")
    try:
        return _build(keras, width, input_size)
    finally:
        keras.config.set_dtype_policy(previous)


def _build(keras: Any, width: float, input_size: int) -> Any:
    layers = keras.layers
    out_size = output_size_for(input_size)
    inp = keras.Input((input_size, input_size, input_size, 1), name="ct")
    maps = [_scaled(f, width) for f in FEATURE_MAPS]
    activations = []
    for p, scale in enumerate(SCALE_FACTORS):
        x = _crop_center(inp, path_input_size(scale, out_size))
        if scale > 1:
            x = x[:, scale // 2 :: scale, scale // 2 :: scale, scale // 2 :: scale, :]
        for i, f in enumerate(maps):
            x = _preact_block(x, f, 3, f"path{p}.{i + 1}")
        if scale > 1:
            x = layers.UpSampling3D(size=scale, name=f"path{p}.up")(x)
        activations.append(_crop_center(x, out_size))
    x = layers.Concatenate(axis=-1, name="concat")(activations)
    channels = [_scaled(f, width) for f in FULLY_CONNECTED] + [len(CLASSES)]
    for i, f in enumerate(channels):
        x = _preact_block(x, f, 1, f"fully_connected.{i}")
    out = layers.Softmax(axis=-1, name="softmax", dtype="float32")(x)
    return keras.Model(inp, out, name="blast_ct")


def keras_weight_names(model: Any) -> dict[str, list[tuple[str, Any]]]:
    """``{layer name: [(state-dict suffix, variable), ...]}`` for the layers that carry weights."""
    suffixes = {
        "BatchNormalization": ("weight", "bias", "running_mean", "running_var"),
        "PReLU": ("weight",),
        "Conv3D": ("weight",),
    }
    found: dict[str, list[tuple[str, Any]]] = {}
    for layer in model.layers:
        kind = type(layer).__name__
        if kind in suffixes:
            found[layer.name] = list(zip(suffixes[kind], layer.weights, strict=True))
    return found


def set_blast_ct_weights(model: Any, arrays: dict[str, np.ndarray]) -> None:
    """Load named arrays (``<layer name>.<suffix>``, Keras layout) into ``model``; every weight must be there."""
    missing = []
    for layer_name, pairs in keras_weight_names(model).items():
        for suffix, variable in pairs:
            key = f"{layer_name}.{suffix}"
            if key not in arrays:
                missing.append(key)
                continue
            value = np.asarray(arrays[key], dtype=np.float32).reshape(tuple(variable.shape))
            variable.assign(value)
    if missing:
        raise ModelFileError(f"BLAST-CT weights lack {len(missing)} arrays (first: {missing[0]})")


@dataclass(frozen=True)
class BlastCtWeights:
    """One shipped BLAST-CT model: its name (``model_1``...), file and expected SHA-256."""

    name: str
    path: Path
    sha256: str


def shipped_blast_ct(weights_dir: Path = BLAST_CT_WEIGHTS_DIR) -> tuple[BlastCtWeights, ...]:
    """The BLAST-CT models in the package, from their manifest (no TensorFlow)."""
    manifest = weights_dir / MANIFEST_NAME
    try:
        data = json.loads(manifest.read_text())
        return tuple(
            BlastCtWeights(name=str(m["name"]), path=weights_dir / str(m["file"]), sha256=str(m["sha256"]))
            for m in data["models"]
        )
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModelFileError(f"the BLAST-CT weights manifest {manifest} is missing or malformed: {exc}") from None


def read_blast_ct_arrays(weights: BlastCtWeights) -> dict[str, np.ndarray]:
    """The named arrays of one model after its SHA-256 matched the manifest (ModelFileError if not)."""
    if not weights.path.is_file():
        raise ModelFileError(f"the BLAST-CT weights {weights.path.name} are missing from the installation")
    actual = sha256_of(weights.path)
    if actual != weights.sha256:
        raise ModelFileError(
            f"the BLAST-CT weights {weights.path.name} fail their checksum (sha256 {actual[:12]}..., "
            f"expected {weights.sha256[:12]}...): reinstall the package"
        )
    try:
        with np.load(weights.path, allow_pickle=False) as data:
            return {key: np.asarray(data[key]) for key in data.files}
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"{weights.path.name} is not a readable weights archive: {exc}") from None


def load_blast_ct(weights: BlastCtWeights) -> Any:
    """A built full-width BLAST-CT ``keras.Model`` with the checked weights of ``weights``."""
    arrays = read_blast_ct_arrays(weights)
    model = build_blast_ct()
    set_blast_ct_weights(model, arrays)
    return model
