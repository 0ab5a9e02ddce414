"""The folded graph as one TensorFlow function, in float32 or mixed float32/bfloat16.

Written with plain ``tf.nn`` ops at a fixed batch shape, so TensorFlow's oneDNN remapper
fuses convolution + bias + ELU, and convolution + bias + residual addition + ELU, into
single primitives; in bfloat16 they run on AMX tiles or AVX512-BF16 units where the CPU has
them, which halves the memory traffic as well. Tensors are NHWC float32 (``(n, S, S, 1)``).
TensorFlow is reached only through :mod:`worker.model.framework`.

**Where bfloat16 is used.** Only at the coarse resolutions: an op runs in bfloat16 when its
output is at most 1/:data:`BF16_MIN_DOWNSCALE` of the input side (for DR-UNet the three
deepest levels, about 40 % of the FLOPs); the full, half and quarter resolution levels (the first
and last layers, the decoder's fine levels, the sigmoid and so the threshold region) run
in float32, and oneDNN accumulates bfloat16 convolutions in float32. Measured on the shipped
model against the float32 reference on 16 phantom studies through the whole pipeline (AMD
EPYC Zen 4 with AVX512-BF16, bfloat16 native): bfloat16 everywhere changed volumes by up to
1.13 % (the 1 % bar failed; an Intel Xeon with AMX gave 1.34 % on the same study), bfloat16
from 1/4 resolution down by up to 0.61 % (all smaller: rounding the fine levels biases
the boundary), from 1/8 down by at most 0.04 %. Keeping the first and last layers and the
sigmoid in float32 alone changed nothing (still 1.13 %).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from worker.model.fold import Activation, Add, Affine, Concat, Conv, FoldedGraph, MaxPool, Multiply, consumer_counts
from worker.model.weights import ModelInfo

F32 = npt.NDArray[np.float32]

# --- TensorFlow -------------------------------------------------------------------------------


def _tf() -> Any:
    from worker.model import framework

    return framework.tf()


def _tf_activation(tf: Any, kind: str, x: Any) -> Any:
    if kind == "elu":
        return tf.nn.elu(x)
    if kind == "relu":
        return tf.nn.relu(x)
    if kind == "sigmoid":
        return tf.nn.sigmoid(x)
    return x


def _residual_activations(graph: FoldedGraph) -> dict[str, str]:
    """``{add output: activation}`` for each Add read only by one activation (fused as one step)."""
    consumers = consumer_counts(graph.ops)
    by_input = {op.input: op for op in graph.ops if isinstance(op, Activation)}
    fused = {}
    for op in graph.ops:
        if isinstance(op, Add) and consumers.get(op.output) == 1 and op.output in by_input:
            fused[op.output] = by_input[op.output].kind
    return fused


BF16_MIN_DOWNSCALE = 8
"""bfloat16 only where an op's output side is at most ``input_size / BF16_MIN_DOWNSCALE`` (module docstring)."""


def bfloat16_ops(graph: FoldedGraph) -> frozenset[int]:
    """Indices of the ops of ``graph`` that the ``bfloat16`` function runs in bfloat16.

    Those whose output is at 1/:data:`BF16_MIN_DOWNSCALE` of the input side or coarser;
    never the output op (its sigmoid gives the probabilities that are thresholded).
    """
    sides = graph.sides()
    coarse = graph.input_size // BF16_MIN_DOWNSCALE
    return frozenset(
        index for index, op in enumerate(graph.ops) if sides[op.output] <= coarse and op.output != graph.output_name
    )


def tf_function(graph: FoldedGraph, *, batch_size: int, dtype: str = "float32") -> Any:
    """The folded graph as one compiled TensorFlow function of ``(batch_size, S, S, 1)`` float32.

    ``dtype`` ``"bfloat16"`` runs the ops :func:`bfloat16_ops` names with bfloat16 weights
    and activations (cast at the level boundaries) and the rest in float32; the output is
    float32. Written with plain ``tf.nn`` ops so the oneDNN remapper sees convolution ->
    BiasAdd -> (AddV2 ->) activation chains it fuses into one primitive.
    """
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    tf = _tf()
    low = bfloat16_ops(graph) if dtype == "bfloat16" else frozenset()
    compute = {index: tf.bfloat16 if index in low else tf.float32 for index in range(len(graph.ops))}
    weights: dict[int, tuple[Any, Any]] = {}
    for index, op in enumerate(graph.ops):
        if isinstance(op, Conv):
            kernel = op.kernel.transpose(0, 1, 3, 2) if op.transpose else op.kernel  # tf: (kh, kw, out, in)
            weights[index] = (tf.constant(kernel, dtype=compute[index]), tf.constant(op.bias, dtype=compute[index]))
        elif isinstance(op, Affine):
            weights[index] = (tf.constant(op.scale, dtype=compute[index]), tf.constant(op.shift, dtype=compute[index]))
    residual = _residual_activations(graph)
    skipped = {op.output for op in graph.ops if isinstance(op, Activation) and op.input in residual}
    size = graph.input_size

    def run(x: Any) -> Any:
        tensors = {graph.input_name: x}
        for index, op in enumerate(graph.ops):
            dt = compute[index]

            def read(name: str, dt: Any = dt) -> Any:
                tensor = tensors[name]
                return tensor if tensor.dtype == dt else tf.cast(tensor, dt)

            if isinstance(op, Conv):
                kernel, bias = weights[index]
                source = read(op.input)
                if op.transpose:
                    shape = source.shape
                    out_shape = (shape[0], shape[1] * op.stride, shape[2] * op.stride, op.out_channels)
                    y = tf.nn.conv2d_transpose(source, kernel, out_shape, op.stride, padding="SAME")
                else:
                    y = tf.nn.conv2d(source, kernel, op.stride, padding="SAME")
                y = _tf_activation(tf, op.activation, tf.nn.bias_add(y, bias))
            elif isinstance(op, MaxPool):
                y = tf.nn.max_pool2d(read(op.input), op.size, op.size, "VALID")
            elif isinstance(op, Concat):
                y = tf.concat([read(i) for i in op.inputs], axis=-1)
            elif isinstance(op, Add | Multiply):
                y = read(op.inputs[0])
                for other in op.inputs[1:]:
                    y = y + read(other) if isinstance(op, Add) else y * read(other)
                if op.output in residual:  # the activation that reads it, fused here
                    y = _tf_activation(tf, residual[op.output], y)
            elif isinstance(op, Activation):
                y = tensors[op.input] if op.output in skipped else _tf_activation(tf, op.kind, read(op.input))
            else:
                scale, shift = weights[index]
                y = read(op.input) * scale + shift
            tensors[op.output] = y
        return tf.cast(tensors[graph.output_name], tf.float32)

    spec = tf.TensorSpec((batch_size, size, size, 1), tf.float32)
    return tf.function(run, input_signature=[spec], autograph=False)


class FoldedTfSegmenter:
    """A folded model as one TensorFlow function at a fixed batch shape (the last batch padded).

    ``predict`` takes ``(n, S, S)`` float32 in [-1, 1] and returns ``(n, S, S)`` float32
    probabilities. ``dtype`` is ``"float32"`` or ``"bfloat16"`` (bfloat16 at the coarse
    levels only: :func:`bfloat16_ops`).
    """

    def __init__(self, graph: FoldedGraph, info: ModelInfo, *, batch_size: int = 8, dtype: str = "float32") -> None:
        if graph.input_size != info.input_size:
            raise ValueError(f"graph input {graph.input_size} does not match the model's {info.input_size}")
        self._info = info
        self.batch_size = max(1, int(batch_size))
        self.engine = "folded-bf16" if dtype == "bfloat16" else "folded"
        self._fn = tf_function(graph, batch_size=self.batch_size, dtype=dtype)

    @property
    def info(self) -> ModelInfo:
        return self._info

    def predict(self, images: F32) -> F32:
        size = self._info.input_size
        if images.ndim != 3 or images.shape[1:] != (size, size):
            raise ValueError(f"expected (n, {size}, {size}) images, got {images.shape}")
        n = int(images.shape[0])
        out = np.empty((n, size, size), dtype=np.float32)
        batch = np.zeros((self.batch_size, size, size, 1), dtype=np.float32)
        for start in range(0, n, self.batch_size):
            stop = min(start + self.batch_size, n)
            batch[: stop - start, ..., 0] = images[start:stop]
            batch[stop - start :] = 0.0
            out[start:stop] = self._fn(batch).numpy()[: stop - start, ..., 0]
        return out
