"""The folded graph as one TensorFlow function, in float32 or bfloat16.

Written with plain ``tf.nn`` ops at a fixed batch shape, so TensorFlow's oneDNN remapper
fuses convolution + bias + ELU, and convolution + bias + residual addition + ELU, into
single primitives; in bfloat16 they run on AMX tiles where the CPU has them (Sapphire
Rapids and later), which halves the memory traffic as well. Tensors are NHWC float32
(``(n, S, S, 1)``). TensorFlow is reached only through :mod:`worker.model.framework`.
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


def tf_function(graph: FoldedGraph, *, batch_size: int, dtype: str = "float32") -> Any:
    """The folded graph as one compiled TensorFlow function of ``(batch_size, S, S, 1)`` float32.

    ``dtype`` ``"bfloat16"`` casts weights and activations to bfloat16 (the output back to
    float32). Written with plain ``tf.nn`` ops so the oneDNN remapper sees convolution ->
    BiasAdd -> (AddV2 ->) activation chains it fuses into one primitive.
    """
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    tf = _tf()
    compute = tf.bfloat16 if dtype == "bfloat16" else tf.float32
    weights: dict[int, tuple[Any, Any]] = {}
    for index, op in enumerate(graph.ops):
        if isinstance(op, Conv):
            kernel = op.kernel.transpose(0, 1, 3, 2) if op.transpose else op.kernel  # tf: (kh, kw, out, in)
            weights[index] = (tf.constant(kernel, dtype=compute), tf.constant(op.bias, dtype=compute))
        elif isinstance(op, Affine):
            weights[index] = (tf.constant(op.scale, dtype=compute), tf.constant(op.shift, dtype=compute))
    residual = _residual_activations(graph)
    skipped = {op.output for op in graph.ops if isinstance(op, Activation) and op.input in residual}
    size = graph.input_size

    def run(x: Any) -> Any:
        tensors = {graph.input_name: tf.cast(x, compute)}
        for index, op in enumerate(graph.ops):
            if isinstance(op, Conv):
                kernel, bias = weights[index]
                source = tensors[op.input]
                if op.transpose:
                    shape = source.shape
                    out_shape = (shape[0], shape[1] * op.stride, shape[2] * op.stride, op.out_channels)
                    y = tf.nn.conv2d_transpose(source, kernel, out_shape, op.stride, padding="SAME")
                else:
                    y = tf.nn.conv2d(source, kernel, op.stride, padding="SAME")
                y = _tf_activation(tf, op.activation, tf.nn.bias_add(y, bias))
            elif isinstance(op, MaxPool):
                y = tf.nn.max_pool2d(tensors[op.input], op.size, op.size, "VALID")
            elif isinstance(op, Concat):
                y = tf.concat([tensors[i] for i in op.inputs], axis=-1)
            elif isinstance(op, Add | Multiply):
                y = tensors[op.inputs[0]]
                for other in op.inputs[1:]:
                    y = y + tensors[other] if isinstance(op, Add) else y * tensors[other]
                if op.output in residual:  # the activation that reads it, fused here
                    y = _tf_activation(tf, residual[op.output], y)
            elif isinstance(op, Activation):
                y = tensors[op.input] if op.output in skipped else _tf_activation(tf, op.kind, tensors[op.input])
            else:
                scale, shift = weights[index]
                y = tensors[op.input] * scale + shift
            tensors[op.output] = y
        return tf.cast(tensors[graph.output_name], tf.float32)

    spec = tf.TensorSpec((batch_size, size, size, 1), tf.float32)
    return tf.function(run, input_signature=[spec], autograph=False)


class FoldedTfSegmenter:
    """A folded model as one TensorFlow function at a fixed batch shape (the last batch padded).

    ``predict`` takes ``(n, S, S)`` float32 in [-1, 1] and returns ``(n, S, S)`` float32
    probabilities. ``dtype`` is ``"float32"`` or ``"bfloat16"`` (compute precision).
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
