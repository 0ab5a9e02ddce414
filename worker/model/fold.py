"""The Keras model folded into a lean graph: BatchNorm into the convolutions, activations fused.

DR-UNet spends much of its time outside its convolutions: every convolution is followed
by a BatchNorm and most by an ELU, and at 256x256 and 128x128 with 8 to 64 channels each
of those is a separate pass over a large tensor (the model is memory-bound on a CPU).
For inference the BatchNorm is a fixed per-channel affine map, so it folds into the
convolution's kernel and bias::

    BN(conv(x)) = gamma * (W * x + b - mean) / sqrt(var + eps) + beta
                = (s W) * x + (s (b - mean) + beta),    s = gamma / sqrt(var + eps)

and the ELU that follows joins the convolution as its activation. :func:`fold_keras_model`
reads a functional Keras model into a :class:`FoldedGraph` (plain numpy weights, one op
per fused step). Two runners execute it: :mod:`worker.model.tf_engine` (one TensorFlow
function, float32 or bfloat16) and :mod:`worker.model.onnx_engine` (ONNX Runtime);
:mod:`worker.model.engines` chooses between them and the Keras reference.

Conventions: the Keras model is NHWC float32 (``(n, S, S, 1)``, inputs windowed to
[-1, 1], outputs probabilities in [0, 1]). Kernels are stored in the Keras layout
``(kh, kw, c_in, c_out)`` (transposed convolutions too, normalised on reading) and
converted where written. A Keras model object is only read through its public attributes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]

ACTIVATIONS = ("linear", "elu", "relu", "sigmoid")


class UnsupportedModelError(ValueError):
    """The Keras model holds a layer the folding does not know; the caller keeps Keras."""


# --- the folded graph -----------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Conv:
    """A 2-D convolution (stride ``stride``, "same" padding) with bias and activation.

    ``kernel`` is ``(kh, kw, c_in, c_out)`` float32 for both kinds; ``transpose=True`` is a
    transposed convolution (kernel ``stride x stride``, output ``stride`` times larger).
    """

    output: str
    input: str
    kernel: F32
    bias: F32
    activation: str = "linear"
    transpose: bool = False
    stride: int = 1

    @property
    def out_channels(self) -> int:
        return int(self.kernel.shape[3])


@dataclass(frozen=True)
class MaxPool:
    output: str
    input: str
    size: int = 2


@dataclass(frozen=True)
class Concat:
    """Concatenation along channels."""

    output: str
    inputs: tuple[str, ...]


@dataclass(frozen=True)
class Add:
    output: str
    inputs: tuple[str, ...]


@dataclass(frozen=True)
class Multiply:
    output: str
    inputs: tuple[str, ...]


@dataclass(frozen=True)
class Activation:
    output: str
    input: str
    kind: str  # one of ACTIVATIONS


@dataclass(frozen=True, eq=False)
class Affine:
    """``x * scale + shift`` per channel (a BatchNorm that could not be folded into a convolution)."""

    output: str
    input: str
    scale: F32
    shift: F32


Op = Conv | MaxPool | Concat | Add | Multiply | Activation | Affine


@dataclass(frozen=True, eq=False)
class FoldedGraph:
    """A feed-forward segmentation network as fused steps in topological order.

    Input ``input_name``: ``(n, input_size, input_size, 1)`` windowed CT in [-1, 1];
    output ``output_name``: ``(n, input_size, input_size, 1)`` probabilities.
    """

    input_name: str
    output_name: str
    input_size: int
    ops: tuple[Op, ...]
    source_layers: dict[str, int] = field(default_factory=dict)  # Keras layer kinds read, for reports

    def sides(self) -> dict[str, int]:
        """``{tensor name: side in pixels}`` for one ``input_size`` slice (every tensor is square)."""
        sides = {self.input_name: self.input_size}
        for op in self.ops:
            if isinstance(op, Conv):
                side_in = sides[op.input]
                sides[op.output] = side_in * op.stride if op.transpose else side_in // op.stride
            elif isinstance(op, MaxPool):
                sides[op.output] = sides[op.input] // op.size
            elif isinstance(op, Concat | Add | Multiply):
                sides[op.output] = sides[op.inputs[0]]
            else:
                sides[op.output] = sides[op.input]
        return sides

    def flops_per_slice(self) -> float:
        """Multiply-adds of the convolutions times two, for one ``input_size`` slice (FLOP).

        Elementwise work (activations, additions, pooling) is left out, as is usual when
        quoting a network's cost; it is small in FLOP though not in memory traffic.
        """
        sides = self.sides()
        total = 0.0
        for op in self.ops:
            if isinstance(op, Conv):
                kh, kw, c_in, c_out = op.kernel.shape
                side = sides[op.input] if op.transpose else sides[op.output]  # where the kernel is applied
                total += 2.0 * side * side * kh * kw * c_in * c_out
        return total


def _layer_inputs(layer: Any) -> list[str]:
    nodes = getattr(layer, "_inbound_nodes", [])
    if len(nodes) != 1:
        raise UnsupportedModelError(f"layer {layer.name} is used {len(nodes)} times; only plain graphs fold")
    return [str(t.name) for t in nodes[0].input_tensors]


def _layer_output(layer: Any) -> str:
    outputs = layer._inbound_nodes[0].output_tensors
    if len(outputs) != 1:
        raise UnsupportedModelError(f"layer {layer.name} has {len(outputs)} outputs")
    return str(outputs[0].name)


def _activation_name(activation: Any) -> str:
    name = str(getattr(activation, "__name__", activation))
    if name not in ACTIVATIONS:
        raise UnsupportedModelError(f"activation {name!r} is not supported")
    return name


def _as_f32(value: Any) -> F32:
    return np.asarray(value, dtype=np.float32)


def _read_layer(layer: Any, inputs: list[str], output: str) -> Op | None:
    """One Keras layer as one op (``None`` for the input layer)."""
    kind = type(layer).__name__
    config = layer.get_config()
    if kind == "InputLayer":
        return None
    if config.get("data_format", "channels_last") != "channels_last":
        raise UnsupportedModelError(f"layer {layer.name}: only channels_last is supported")
    if kind in ("Conv2D", "Conv2DTranspose"):
        strides = tuple(config["strides"])
        kernel_size = tuple(config["kernel_size"])
        if tuple(config.get("dilation_rate", (1, 1))) != (1, 1) or int(config.get("groups", 1)) != 1:
            raise UnsupportedModelError(f"layer {layer.name}: dilated or grouped convolutions are not supported")
        pointwise = kernel_size == (1, 1) and strides == (1, 1)  # 'valid' and 'same' agree
        if strides[0] != strides[1] or (config["padding"] != "same" and not pointwise):
            raise UnsupportedModelError(f"layer {layer.name}: only square strides with 'same' padding fold")
        transpose = kind == "Conv2DTranspose"
        kernel = _as_f32(layer.kernel)
        if transpose:
            if kernel_size != strides or config.get("output_padding") is not None:
                raise UnsupportedModelError(f"layer {layer.name}: transposed kernels must equal their stride")
            kernel = np.ascontiguousarray(kernel.transpose(0, 1, 3, 2))  # Keras (kh, kw, out, in)
        elif any(k % 2 == 0 for k in kernel_size) or strides[0] != 1:
            # 'same' padding of even kernels or strides is asymmetric in Keras: not written here
            raise UnsupportedModelError(f"layer {layer.name}: only stride-1 odd kernels are supported")
        bias = _as_f32(layer.bias) if layer.bias is not None else np.zeros(kernel.shape[3], np.float32)
        return Conv(
            output=output,
            input=inputs[0],
            kernel=kernel,
            bias=bias,
            activation=_activation_name(config.get("activation", "linear")),
            transpose=transpose,
            stride=int(strides[0]),
        )
    if kind == "BatchNormalization":
        if config.get("axis", -1) not in (-1, 3, [3], [-1]) or config.get("renorm"):
            raise UnsupportedModelError(f"layer {layer.name}: only channel-axis BatchNorm folds")
        mean, var = _as_f32(layer.moving_mean), _as_f32(layer.moving_variance)
        gamma = _as_f32(layer.gamma) if layer.gamma is not None else np.ones_like(mean)
        beta = _as_f32(layer.beta) if layer.beta is not None else np.zeros_like(mean)
        scale = (gamma / np.sqrt(var.astype(np.float64) + float(config["epsilon"]))).astype(np.float32)
        return Affine(output=output, input=inputs[0], scale=scale, shift=(beta - mean * scale).astype(np.float32))
    if kind == "ELU":
        if float(config.get("alpha", 1.0)) != 1.0:
            raise UnsupportedModelError(f"layer {layer.name}: ELU alpha must be 1")
        return Activation(output=output, input=inputs[0], kind="elu")
    if kind == "ReLU":
        if config.get("max_value") is not None or float(config.get("negative_slope", 0.0)) or config.get("threshold"):
            raise UnsupportedModelError(f"layer {layer.name}: only plain ReLU is supported")
        return Activation(output=output, input=inputs[0], kind="relu")
    if kind == "Activation":
        return Activation(output=output, input=inputs[0], kind=_activation_name(config["activation"]))
    if kind == "MaxPooling2D":
        pool, strides = tuple(config["pool_size"]), tuple(config["strides"] or config["pool_size"])
        if pool != strides or pool[0] != pool[1] or config["padding"] != "valid":
            raise UnsupportedModelError(f"layer {layer.name}: only square non-overlapping max pooling")
        return MaxPool(output=output, input=inputs[0], size=int(pool[0]))
    if kind == "Concatenate":
        if config.get("axis", -1) not in (-1, 3):
            raise UnsupportedModelError(f"layer {layer.name}: only channel concatenation")
        return Concat(output=output, inputs=tuple(inputs))
    if kind == "Add":
        return Add(output=output, inputs=tuple(inputs))
    if kind == "Multiply":
        return Multiply(output=output, inputs=tuple(inputs))
    raise UnsupportedModelError(f"layer {layer.name} of kind {kind} is not supported by the fast engine")


def consumer_counts(ops: Iterable[Op]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for op in ops:
        names = op.inputs if isinstance(op, Concat | Add | Multiply) else (op.input,)
        for name in names:
            counts[name] = counts.get(name, 0) + 1
    return counts


def _fuse(ops: list[Op], output_name: str) -> list[Op]:
    """Fold Affine into the convolution before it and activations into the op before them.

    A step fuses only where the producer's output has exactly one consumer and is not the
    graph's output, so no intermediate another op reads is lost.
    """
    changed = True
    while changed:
        changed = False
        consumers = consumer_counts(ops)
        by_output = {op.output: i for i, op in enumerate(ops)}
        for index, op in enumerate(ops):
            if not isinstance(op, Affine | Activation):
                continue
            source = by_output.get(op.input)
            if source is None or consumers.get(op.input, 0) != 1 or op.input == output_name:
                continue
            producer = ops[source]
            fused: Op | None = None
            if isinstance(producer, Conv) and producer.activation == "linear":
                if isinstance(op, Affine):
                    kernel = producer.kernel * op.scale  # scales each output channel (last axis)
                    bias = producer.bias * op.scale + op.shift
                    fused = Conv(
                        op.output,
                        producer.input,
                        kernel.astype(np.float32),
                        bias.astype(np.float32),
                        "linear",
                        producer.transpose,
                        producer.stride,
                    )
                else:
                    fused = Conv(
                        op.output,
                        producer.input,
                        producer.kernel,
                        producer.bias,
                        op.kind,
                        producer.transpose,
                        producer.stride,
                    )
            elif isinstance(producer, Affine) and isinstance(op, Affine):
                fused = Affine(
                    op.output, producer.input, producer.scale * op.scale, producer.shift * op.scale + op.shift
                )
            if fused is not None:
                ops[source] = fused
                del ops[index]
                changed = True
                break
    return ops


def fold_keras_model(model: Any) -> FoldedGraph:
    """Read a functional Keras segmentation model into a :class:`FoldedGraph`.

    BatchNorm layers right after a convolution are folded into it, and an activation
    right after a convolution becomes the convolution's own. Raises
    :class:`UnsupportedModelError` for layers outside Conv2D, Conv2DTranspose,
    BatchNormalization, ELU, ReLU, Activation, MaxPooling2D, Concatenate, Add, Multiply.
    """
    try:
        layers = list(model.layers)
        inputs, outputs = list(model.inputs), list(model.outputs)
    except AttributeError as exc:
        raise UnsupportedModelError(f"not a functional Keras model: {exc}") from None
    if len(inputs) != 1 or len(outputs) != 1:
        raise UnsupportedModelError("the model must have one input and one output")
    shape = tuple(inputs[0].shape)
    if len(shape) != 4 or shape[1] != shape[2] or shape[3] != 1 or shape[1] is None:
        raise UnsupportedModelError(f"expected a (n, S, S, 1) input, got {shape}")
    kinds: dict[str, int] = {}
    ops: list[Op] = []
    for layer in layers:
        kind = type(layer).__name__
        kinds[kind] = kinds.get(kind, 0) + 1
        op = _read_layer(layer, _layer_inputs(layer) if kind != "InputLayer" else [], _layer_output(layer))
        if op is not None:
            ops.append(op)
    output_name = str(outputs[0].name)
    fused = _fuse(ops, output_name)
    return FoldedGraph(
        input_name=str(inputs[0].name),
        output_name=output_name,
        input_size=int(shape[1]),
        ops=tuple(fused),
        source_layers=kinds,
    )
