"""Choosing and building the segmenter: the Keras reference or a folded engine, loaded on demand.

``ICHVOL_INFERENCE_ENGINE`` (:data:`ENGINES`) chooses; :func:`load_segmenter` honours it.
Every engine other than ``keras`` must give the reference's masks: the bar (Dice at least
0.99 and volumes within 1 % on phantom studies) is tested in
``tests/worker/model/test_engines.py``. :class:`LazySegmenter` reads the metadata at once
and loads TensorFlow and the weights on first use.

This module reaches TensorFlow/Keras only through :mod:`worker.model.framework`.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from worker.core.errors import ConfigurationError, ModelFileError
from worker.core.settings import Settings
from worker.model import framework
from worker.model.cpu import cpu_has_bf16, cpu_vendor
from worker.model.fold import UnsupportedModelError, fold_keras_model
from worker.model.networks import load_keras_model
from worker.model.onnx_engine import OnnxSegmenter, graph_to_onnx
from worker.model.tf_engine import FoldedTfSegmenter
from worker.model.weights import ModelInfo, Segmenter, read_model_info, resolve_model_path, sha256_of

log = logging.getLogger(__name__)

ENGINES = ("keras", "folded", "folded-bf16", "onnx", "auto")
"""``keras``: the float32 Keras reference (one compiled TensorFlow function, BatchNorm apart);
``folded``: the folded graph in TensorFlow, float32 (same numbers to about 1e-6);
``folded-bf16``: the folded graph in TensorFlow with bfloat16 at the coarse levels only
(1/8 resolution and below, :func:`worker.model.tf_engine.bfloat16_ops`), float32 elsewhere;
fast only on CPUs with AMX or AVX512-BF16, or on a GPU;
``onnx``: the folded graph in ONNX Runtime, float32 (least memory);
``auto`` (the default): the engine :func:`resolve_engine` picks for this machine."""


def onnx_runtime_installed() -> bool:
    """Whether the ``onnx`` engine can run (the ``fast`` extra: onnxruntime and onnx)."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


def resolve_engine(
    engine: str, *, cpuinfo: str | None = None, gpu: bool = False, onnx_available: bool | None = None
) -> str:
    """The concrete engine for ``engine``; unknown names raise ValueError.

    ``auto`` is decided here and only here, from measurements (docs/performance.md):

    * a GPU runs the model: ``folded``;
    * the CPU has bfloat16 units (AMX-BF16 or AVX512-BF16): ``folded-bf16``. On an AMD EPYC
      Zen 4 (AVX512-BF16) it took 0.86x the CPU time of ``folded`` on the paper-size model
      and ``onnx`` 1.34x; on an Intel Xeon with AMX the earlier all-bfloat16 engine ran 2.7x
      ``model.predict`` where ONNX Runtime was slower;
    * an AMD CPU without them, where ONNX Runtime is installed: ``onnx`` (1.3x ``folded`` at
      dims 32 and 2.5x on the shipped dims-8 model on an AMD EPYC without AVX-512, where
      TensorFlow's oneDNN float32 gains little);
    * any other or unknown CPU: ``folded`` (float32, never slower than ``keras``).

    Every engine it can return passes the accuracy bar (``tests/worker/model/test_engines.py``).
    ``cpuinfo`` (default: /proc/cpuinfo), ``gpu`` and ``onnx_available`` are for tests.
    """
    name = engine.strip().lower()
    if name not in ENGINES:
        raise ValueError(f"ICHVOL_INFERENCE_ENGINE must be one of {', '.join(ENGINES)}, got {engine!r}")
    if name == "auto":
        if gpu:
            return "folded"
        if cpu_has_bf16(cpuinfo):
            return "folded-bf16"
        if cpu_vendor(cpuinfo) == "AuthenticAMD" and (
            onnx_runtime_installed() if onnx_available is None else onnx_available
        ):
            return "onnx"
        return "folded"
    if name == "folded-bf16" and not cpu_has_bf16(cpuinfo):
        log.warning(
            "ICHVOL_INFERENCE_ENGINE=folded-bf16 on a CPU without bfloat16 units: unless a GPU runs the "
            "model, bfloat16 is emulated and slower than 'folded' (2.7x slower measured); 'auto' chooses for you"
        )
    return name


def fast_segmenter(model: Any, info: ModelInfo, *, engine: str, batch_size: int = 8, threads: int = 0) -> Any:
    """A :class:`worker.model.weights.Segmenter` running ``model`` (a loaded Keras model) on ``engine``.

    ``engine`` is a concrete engine other than ``keras`` (see :func:`resolve_engine`).
    Raises :class:`UnsupportedModelError` when the model cannot be folded.
    """
    graph = fold_keras_model(model)
    if engine == "folded":
        return FoldedTfSegmenter(graph, info, batch_size=batch_size, dtype="float32")
    if engine == "folded-bf16":
        return FoldedTfSegmenter(graph, info, batch_size=batch_size, dtype="bfloat16")
    if engine == "onnx":
        return OnnxSegmenter(graph_to_onnx(graph), info, batch_size=batch_size, threads=threads)
    raise ValueError(f"no fast engine named {engine!r}")


class KerasSegmenter:
    """A loaded model behind the :class:`worker.model.weights.Segmenter` protocol (the float32 reference).

    Inference runs through one compiled function at a fixed batch shape (the last
    batch is padded): calling the model eagerly on large batches costs many GB.
    """

    engine = "keras"

    def __init__(self, model: Any, info: ModelInfo, *, batch_size: int = 8) -> None:
        self._model = model
        self._info = info
        self.batch_size = max(1, int(batch_size))
        tf = framework.tf()
        size = info.input_size
        spec = tf.TensorSpec((self.batch_size, size, size, 1), tf.float32)
        self._fn = tf.function(lambda x: model(x, training=False), input_signature=[spec], autograph=False)

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def keras_model(self) -> Any:
        return self._model

    def predict(self, images: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        n = int(images.shape[0])
        size = self._info.input_size
        if images.ndim != 3 or images.shape[1:] != (size, size):
            raise ValueError(f"expected (n, {size}, {size}) images, got {images.shape}")
        out = np.empty((n, size, size), dtype=np.float32)
        batch = np.zeros((self.batch_size, size, size, 1), dtype=np.float32)
        for start in range(0, n, self.batch_size):
            stop = min(start + self.batch_size, n)
            batch[: stop - start, ..., 0] = images[start:stop]
            batch[stop - start :] = 0.0
            probs = self._fn(batch).numpy()
            out[start:stop] = probs[: stop - start, ..., 0]
        return out


class LazySegmenter:
    """A segmenter whose metadata is read at once (no TensorFlow) and whose model loads on first use.

    ``ichvol segment`` uses it so that an unusable study fails in milliseconds, before
    TensorFlow is imported; :meth:`load` lets the pipeline time the loading on its own.
    ``engine`` and ``threads`` are passed to :func:`load_segmenter`; an unknown engine
    fails here, before anything loads.
    """

    def __init__(
        self, model_path: str | Path | None = None, *, batch_size: int = 8, engine: str = "keras", threads: int = 0
    ) -> None:
        self._path, _ = resolve_model_path(model_path)
        self._info = read_model_info(self._path)
        self._batch_size = batch_size
        self._engine = _checked_engine(engine)
        self._threads = threads
        self._loaded: Segmenter | None = None

    @property
    def info(self) -> ModelInfo:
        return self._info

    def load(self) -> Segmenter:
        if self._loaded is None:
            self._loaded = load_segmenter(
                self._path, batch_size=self._batch_size, engine=self._engine, threads=self._threads
            )
        return self._loaded

    def predict(self, images: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return self.load().predict(images)

    @property
    def engine(self) -> str:
        """The engine that runs the model: the concrete one once loaded, the one asked for before."""
        if self._loaded is None:
            return self._engine
        return str(getattr(self._loaded, "engine", "keras"))


def _checked_engine(engine: str) -> str:
    try:
        resolve_engine(engine)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    return engine


def load_segmenter(
    model_path: str | Path | None = None,
    *,
    batch_size: int = 8,
    engine: str = "keras",
    threads: int = 0,
    warm_up: bool = True,
) -> Segmenter:
    """Resolve (``None``: shipped default, checksum verified), read metadata, build the segmenter.

    ``engine`` (``ICHVOL_INFERENCE_ENGINE``, see :data:`ENGINES`):
    ``keras`` returns the float32 reference :class:`KerasSegmenter`; the others fold the
    model (:mod:`worker.model.fold`). A model the folding cannot read (a layer it does
    not know) falls back to ``keras`` with a warning. ``threads`` sets ONNX Runtime's
    intra-op threads (0: all cores; TensorFlow's come from :func:`worker.model.framework.set_threads`).
    ``warm_up`` runs one batch of zeros, so tracing and kernel set-up count as loading.
    """
    try:
        gpu = engine.strip().lower() == "auto" and framework.device_description() != "CPU"
        concrete = resolve_engine(engine, gpu=gpu)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    path, _is_default = resolve_model_path(model_path)
    digest = sha256_of(path)
    info = read_model_info(path, sha256=digest)
    model = load_keras_model(path)
    expected_shape = (None, info.input_size, info.input_size, 1)
    if tuple(model.input_shape) != expected_shape:
        raise ModelFileError(
            f"{path.name}: model input {tuple(model.input_shape)} does not match its metadata {expected_shape}"
        )
    info = replace(info, sha256=digest)
    segmenter: Segmenter | None = None
    if concrete != "keras":
        try:
            segmenter = fast_segmenter(model, info, engine=concrete, batch_size=batch_size, threads=threads)
            log.info("inference engine %s (asked: %s)", concrete, engine)
        except UnsupportedModelError as exc:
            log.warning("inference engine %s cannot run %s (%s); using keras", concrete, path.name, exc)
    if segmenter is None:
        segmenter = KerasSegmenter(model, info, batch_size=batch_size)
    if warm_up:  # trace and build the kernels now, not in the first study's inference
        segmenter.predict(np.zeros((1, info.input_size, info.input_size), dtype=np.float32))
    return segmenter


def configured_segmenter(settings: Settings, *, lazy: bool = False) -> Segmenter:
    """The segmenter the settings name: weights (``ICHVOL_MODEL``), engine, batch size, threads.

    ``lazy``: a :class:`LazySegmenter` (metadata now, TensorFlow and the weights on first use),
    for commands that should fail fast on unusable input; else loaded and warmed up now.
    """
    framework.set_threads(settings.inference_threads)
    if lazy:
        return LazySegmenter(
            settings.model_path,
            batch_size=settings.inference_batch_size,
            engine=settings.inference_engine,
            threads=settings.inference_threads,
        )
    return load_segmenter(
        settings.model_path,
        batch_size=settings.inference_batch_size,
        engine=settings.inference_engine,
        threads=settings.inference_threads,
    )
