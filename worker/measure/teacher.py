"""The BLAST-CT teacher on one CT series: their preprocessing, tiled inference, back to the native grid.

What :func:`predict_teacher` does, step by step, as the BLAST-CT inference does it
(``biomedia-mira/blast-ct``; re-implemented here, not copied):

1. **Orientation** (:mod:`worker.measure.teacher_grid`): the series' axes are permuted and
   flipped so that the array axes are (superior, posterior, left), each increasing: the
   "standard radiology" orientation their ``reorient_image`` produces. Like theirs, this
   only permutes and flips the image's own axes; an oblique or tilted series is resampled
   along its own axes, not onto the patient axes.
2. **1 mm isotropic** (linear interpolation along each axis, origin on the first voxel,
   ``round(extent / 1 mm + 1)`` voxels per axis, as theirs; outside values: the image minimum).
   Uneven slice gaps are honoured (the real slice positions are interpolated).
3. **Window** [-15, 100] HU clipped and scaled linearly to [-1, 1].
4. **Tiles**: their inference cuts the volume into 30^3 output tiles on a grid starting at
   voxel 0 and gives each a 110^3 input patch centred on it, padded by repeating the edge
   voxel. The network is fully convolutional and its subsampling factors (5 and 3) divide 15,
   so a larger input patch ``15 k + 80`` gives exactly the same numbers on ``15 k`` output
   voxels (tested). :data:`TILE` is their 30: on the GE scan 60 and 90 were no faster
   (measured in docs/performance.md), and 30 keeps a model call under 200 MB.
5. **Softmax** per model, averaged over the models of the ensemble (their ensemble averages
   probabilities); the class is the argmax.
6. **Back to the native grid**: labels by nearest neighbour (as their saver does);
   probabilities by linear interpolation (a smooth soft target; argmax of them may differ from
   ``labels`` at a few boundary voxels).

Denormal floats stall the CPU in this network (about 90 minutes a scan in PyTorch without
flushing them). TensorFlow's CPU kernels run with flush-to-zero and denormals-are-zero set,
so the float32 engine is not affected (191 s a scan, measured), nor is bfloat16 (147 s); the
ONNX Runtime session sets ``session.set_denormal_as_zero`` (:mod:`worker.model.blast_ct_onnx`).

Research use only, not for clinical use.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from worker.core.ct import CtSeries
from worker.core.errors import ConfigurationError, ModelFileError
from worker.measure.teacher_grid import ReorientedGrid, to_native, to_reoriented_1mm
from worker.model import framework
from worker.model.blast_ct_net import (
    CLASSES,
    build_blast_ct,
    output_size_for,
    read_blast_ct_arrays,
    set_blast_ct_weights,
    shipped_blast_ct,
)

log = logging.getLogger(__name__)

BLAST_CT_CLASSES = CLASSES
"""The five classes in output order: background, IPH, EAH, oedema, IVH."""
HEMORRHAGE_CLASSES = (1, 2, 4)
"""IPH, EAH and IVH: the classes that are blood (oedema is not)."""
HU_WINDOW = (-15.0, 100.0)
MARGIN = 40
"""Input voxels the network needs on each side of its output: (110 - 30) / 2."""
TILE = 30
"""Output edge of one model call (a multiple of 15): input patches of ``TILE + 80`` voxels."""
DEFAULT_MODELS = ("model_1",)


@dataclass(frozen=True)
class TeacherPrediction:
    """The teacher's output on the series' native grid (axes ``(slice, row, column)`` as :class:`CtSeries`).

    ``probabilities``: float32 ``(5, z, y, x)``, class probabilities in :data:`BLAST_CT_CLASSES`
    order (mean over the models), summing to 1 per voxel. ``labels``: uint8 ``(z, y, x)``,
    the argmax class (0 background ... 4 IVH). ``model_names`` and ``model_sha256``: the
    models that ran, with the SHA-256 of their weights files.
    """

    probabilities: npt.NDArray[np.float32]
    labels: npt.NDArray[np.uint8]
    model_names: tuple[str, ...]
    model_sha256: tuple[str, ...]

    @property
    def hemorrhage_probability(self) -> npt.NDArray[np.float32]:
        """float32 ``(z, y, x)``: P(IPH) + P(EAH) + P(IVH)."""
        p = self.probabilities
        return np.asarray(p[1] + p[2] + p[4], dtype=np.float32)

    @property
    def hemorrhage_mask(self) -> npt.NDArray[np.uint8]:
        """uint8 ``(z, y, x)``: 1 where the label is IPH, EAH or IVH."""
        return np.isin(self.labels, HEMORRHAGE_CLASSES).astype(np.uint8)


class BlastCtTeacher:
    """Built BLAST-CT Keras models (an ensemble of one or more) and how to run them.

    ``models``: Keras models from :func:`worker.model.blast_ct_net.build_blast_ct` (any width,
    any input size; the output edge is read from the model and is exact against their 30^3 tiles
    when it is a multiple of 15). ``names`` and ``sha256`` say which weights they hold.
    ``models`` may also be :class:`worker.model.blast_ct_onnx.OnnxBlastCt` runners. ``engine``
    names how they run (``float32``, ``bfloat16`` or ``onnx``; recorded in result.json).
    """

    def __init__(
        self, models: Sequence[Any], names: Sequence[str], sha256: Sequence[str], *, engine: str = "float32"
    ) -> None:
        if not models or len(models) != len(names) or len(names) != len(sha256):
            raise ValueError("a teacher needs at least one model, each with a name and a sha256")
        self._models = tuple(models)
        self.names: tuple[str, ...] = tuple(names)
        self.sha256: tuple[str, ...] = tuple(sha256)
        self.engine = engine
        size = int(self._models[0].input_shape[1])
        self.input_size = size
        self.tile = output_size_for(size)
        self.margin = (size - self.tile) // 2
        self._fns: list[Any] = []

    @classmethod
    def from_keras(cls, models: Sequence[Any], names: Sequence[str], sha256: Sequence[str]) -> BlastCtTeacher:
        """A teacher around models already built (tests: tiny in-memory networks)."""
        return cls(models, names, sha256)

    def _functions(self) -> list[Any]:
        """One callable per model: ``(1, S, S, S, 1)`` float32 -> ``(1, O, O, O, 5)`` float32 probabilities."""
        if not self._fns:
            for model in self._models:
                if hasattr(model, "predict_patch"):  # an ONNX Runtime model (worker.model.blast_ct_onnx)
                    self._fns.append(model.predict_patch)
                    continue
                tf = framework.tf()
                size = self.input_size
                spec = tf.TensorSpec((1, size, size, size, 1), tf.float32)
                fn = tf.function(
                    lambda x, m=model, t=tf: t.cast(m(x, training=False), t.float32),
                    input_signature=[spec],
                    autograph=False,
                )
                self._fns.append(lambda x, f=fn: f(x).numpy())
        return self._fns

    def predict_volume(self, volume: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Mean class probabilities ``(5, D, H, W)`` float32 for a windowed 1 mm volume ``(D, H, W)``.

        Output tiles of :attr:`tile` voxels on a grid from voxel 0; each input patch is the
        tile plus :attr:`margin` voxels on every side, the volume padded by edge repetition.
        """
        shape = volume.shape
        t, m = self.tile, self.margin
        counts = [-(-s // t) for s in shape]
        padded = np.pad(volume, [(m, c * t - s + m) for s, c in zip(shape, counts, strict=True)], mode="edge").astype(
            np.float32
        )
        out = np.zeros((len(BLAST_CT_CLASSES), *(c * t for c in counts)), dtype=np.float32)
        fns = self._functions()
        for i in range(counts[0]):
            for j in range(counts[1]):
                for k in range(counts[2]):
                    patch = padded[i * t : i * t + t + 2 * m, j * t : j * t + t + 2 * m, k * t : k * t + t + 2 * m]
                    x = patch[None, ..., None]
                    acc = np.zeros((t, t, t, len(BLAST_CT_CLASSES)), dtype=np.float32)
                    for fn in fns:
                        acc += fn(x)[0]
                    out[:, i * t : (i + 1) * t, j * t : (j + 1) * t, k * t : (k + 1) * t] = np.moveaxis(acc, -1, 0)
        out /= len(fns)
        return np.ascontiguousarray(out[:, : shape[0], : shape[1], : shape[2]])


def window(
    hu: npt.NDArray[np.float32], low: float = HU_WINDOW[0], high: float = HU_WINDOW[1]
) -> npt.NDArray[np.float32]:
    """HU clipped to [low, high] and mapped linearly to [-1, 1] (their IntensityWindowNormalization)."""
    clipped = np.clip(hu, low, high)
    return ((2.0 * clipped - low - high) / (high - low)).astype(np.float32)


def predict_teacher(series: CtSeries, teacher: BlastCtTeacher) -> TeacherPrediction:
    """The teacher's class probabilities and labels for ``series`` on its native grid (see the module doc)."""
    start = time.perf_counter()
    grid: ReorientedGrid = to_reoriented_1mm(series)
    probs_1mm = teacher.predict_volume(window(grid.volume))
    labels_1mm = np.argmax(probs_1mm, axis=0).astype(np.uint8)
    labels = to_native(labels_1mm, grid, nearest=True).astype(np.uint8)
    probabilities = np.stack([to_native(p, grid, nearest=False) for p in probs_1mm]).astype(np.float32)
    probabilities /= np.maximum(probabilities.sum(axis=0, keepdims=True), 1e-6)
    log.info(
        "teacher: %s on %s voxels (1 mm) in %.1f s",
        ",".join(teacher.names),
        grid.volume.shape,
        time.perf_counter() - start,
    )
    return TeacherPrediction(
        probabilities=probabilities, labels=labels, model_names=teacher.names, model_sha256=teacher.sha256
    )


def teacher_engine(engine: str) -> str:
    """How the teacher runs for the project's engine name (``ICHVOL_INFERENCE_ENGINE``, ``--engine``).

    ``bfloat16``: TensorFlow with bfloat16 compute, where :func:`worker.model.engines.resolve_engine`
    picks ``folded-bf16`` (``auto`` on a CPU with bfloat16 units, or asked for); ``onnx``: ONNX
    Runtime float32, only when asked for by name (on the AMD EPYC Zen 4 it took 0.85 s a patch
    against TensorFlow's 0.37 s float32, so ``auto`` does not choose it for this 3-D network);
    ``float32``: TensorFlow float32 otherwise. Unknown names raise ConfigurationError.
    """
    from worker.model.engines import resolve_engine

    try:
        concrete = resolve_engine(engine)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    if concrete == "folded-bf16":
        return "bfloat16"
    if engine.strip().lower() == "onnx":
        return "onnx"
    return "float32"


def load_teacher(models: Sequence[str] | None = None, *, engine: str = "auto", threads: int = 0) -> BlastCtTeacher:
    """The shipped BLAST-CT models named in ``models`` (default :data:`DEFAULT_MODELS`), sha256-checked.

    ``engine``: a project engine name (:func:`teacher_engine` says how it maps); ``threads``:
    ONNX Runtime intra-op threads (0: all cores). Raises :class:`worker.core.errors.ModelFileError`
    for an unknown model name or weights that fail their checksum.
    """
    shipped = {w.name: w for w in shipped_blast_ct()}
    wanted = tuple(models) if models else DEFAULT_MODELS
    unknown = [name for name in wanted if name not in shipped]
    if unknown:
        raise ModelFileError(f"no shipped BLAST-CT model {unknown[0]!r}; shipped: {', '.join(sorted(shipped))}")
    kind = teacher_engine(engine)
    built: list[Any] = []
    for name in wanted:
        arrays = read_blast_ct_arrays(shipped[name])
        if kind == "onnx":
            from worker.model.blast_ct_onnx import OnnxBlastCt

            built.append(OnnxBlastCt(arrays, input_size=TILE + 2 * MARGIN, threads=threads))
            continue
        model = build_blast_ct(input_size=TILE + 2 * MARGIN, dtype=kind)
        set_blast_ct_weights(model, arrays)
        built.append(model)
    return BlastCtTeacher(built, wanted, [shipped[n].sha256 for n in wanted], engine=kind)
