"""Fast inference: the Keras model folded into a lean graph, run in bfloat16 or by ONNX Runtime.

DR-UNet spends much of its time outside its convolutions: every convolution is followed
by a BatchNorm and most by an ELU, and at 256x256 and 128x128 with 8 to 64 channels each
of those is a separate pass over a large tensor (the model is memory-bound on a CPU).
For inference the BatchNorm is a fixed per-channel affine map, so it folds into the
convolution's kernel and bias::

    BN(conv(x)) = gamma * (W * x + b - mean) / sqrt(var + eps) + beta
                = (s W) * x + (s (b - mean) + beta),    s = gamma / sqrt(var + eps)

and the ELU that follows joins the convolution as its activation. :func:`fold_keras_model`
reads a functional Keras model into a :class:`FoldedGraph` (plain numpy weights, one op
per fused step). Two runners execute it:

* :class:`FoldedTfSegmenter`: the folded graph as one TensorFlow function of plain
  ``tf.nn`` ops at a fixed batch shape, in float32 or bfloat16. TensorFlow's oneDNN
  remapper then fuses convolution + bias + ELU, and convolution + bias + residual
  addition + ELU, into single primitives; in bfloat16 they run on AMX tiles where the
  CPU has them (Sapphire Rapids and later), which halves the memory traffic as well.
* :class:`OnnxSegmenter`: the folded graph written as ONNX (:func:`graph_to_onnx`,
  built with the ``onnx`` helpers, no tf2onnx) and run by ONNX Runtime: a quarter of
  TensorFlow's memory, about TensorFlow's float32 speed.

``ICHVOL_INFERENCE_ENGINE`` (:data:`ENGINES`) chooses; :func:`worker.model.networks.load_segmenter`
honours it. Every engine other than ``keras`` must give the reference's masks: the bar
(Dice at least 0.99 and volumes within 1 % on phantom studies) is tested in
``tests/worker/test_fast_inference.py``.

Conventions: the Keras model and the TensorFlow runner are NHWC float32 (``(n, S, S, 1)``,
inputs windowed to [-1, 1], outputs probabilities in [0, 1]); the ONNX graph is NCHW
(``(n, 1, S, S)``), so the pipeline's ``(n, S, S)`` slices go in by a reshape. Kernels are
stored in the Keras layout ``(kh, kw, c_in, c_out)`` (transposed convolutions too,
normalised on reading) and converted where written.

TensorFlow is reached only through :mod:`worker.model.framework`; ONNX Runtime is imported
lazily when a session is built. A Keras model object is only read through its public
attributes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from worker.model.weights import ModelInfo

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]

ENGINES = ("keras", "folded", "folded-bf16", "onnx", "auto")
"""``keras``: the float32 Keras reference (one compiled TensorFlow function, BatchNorm apart);
``folded``: the folded graph in TensorFlow, float32 (same numbers to about 1e-6);
``folded-bf16``: the folded graph in TensorFlow with bfloat16 weights and activations
(fast only on CPUs with AMX or AVX512-BF16, or on a GPU);
``onnx``: the folded graph in ONNX Runtime, float32 (least memory);
``auto``: decided by :func:`resolve_engine` from the machine (measured in docs/performance.md):
``folded-bf16`` where the CPU has AMX-BF16 or AVX512-BF16, ``onnx`` on AMD CPUs (ONNX Runtime
1.3 to 2.5x faster than TensorFlow there, and installed), else ``folded``; ``folded`` when a GPU runs the model."""

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

    def flops_per_slice(self) -> float:
        """Multiply-adds of the convolutions times two, for one ``input_size`` slice (FLOP).

        Elementwise work (activations, additions, pooling) is left out, as is usual when
        quoting a network's cost; it is small in FLOP though not in memory traffic.
        """
        sizes = {self.input_name: self.input_size}
        total = 0.0
        for op in self.ops:
            if isinstance(op, Conv):
                side_in = sizes[op.input]
                kh, kw, c_in, c_out = op.kernel.shape
                if op.transpose:
                    side_out = side_in * op.stride
                    total += 2.0 * side_in * side_in * kh * kw * c_in * c_out
                else:
                    side_out = side_in // op.stride
                    total += 2.0 * side_out * side_out * kh * kw * c_in * c_out
                sizes[op.output] = side_out
            elif isinstance(op, MaxPool):
                sizes[op.output] = sizes[op.input] // op.size
            elif isinstance(op, Concat | Add | Multiply):
                sizes[op.output] = sizes[op.inputs[0]]
            else:
                sizes[op.output] = sizes[op.input]
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


def _consumers(ops: Iterable[Op]) -> dict[str, int]:
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
        consumers = _consumers(ops)
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


# --- ONNX -------------------------------------------------------------------------------------

ONNX_OPSET = 17
ONNX_INPUT = "ct"
ONNX_OUTPUT = "hematoma"


def graph_to_onnx(graph: FoldedGraph, *, batch_size: int | None = None) -> bytes:
    """The folded graph as a serialised ONNX model: input ``ct`` ``(n, 1, S, S)``, output ``hematoma``.

    ``batch_size`` fixes the batch dimension (``None``: dynamic).
    """
    from onnx import TensorProto, helper, numpy_helper

    nodes: list[Any] = []
    initializers: list[Any] = []
    rename = {graph.input_name: ONNX_INPUT, graph.output_name: ONNX_OUTPUT}

    def name(tensor: str) -> str:
        return rename.get(tensor, tensor)

    def constant(label: str, values: npt.NDArray[Any]) -> str:
        initializers.append(numpy_helper.from_array(np.ascontiguousarray(values), label))
        return label

    def activation(kind: str, source: str, target: str) -> None:
        if kind == "elu":
            nodes.append(helper.make_node("Elu", [source], [target], alpha=1.0))
        elif kind == "relu":
            nodes.append(helper.make_node("Relu", [source], [target]))
        elif kind == "sigmoid":
            nodes.append(helper.make_node("Sigmoid", [source], [target]))
        else:
            nodes.append(helper.make_node("Identity", [source], [target]))

    for index, op in enumerate(graph.ops):
        out = name(op.output)
        if isinstance(op, Conv):
            pre = out if op.activation == "linear" else f"{out}__pre"
            bias = constant(f"b{index}", op.bias)
            kh, kw = int(op.kernel.shape[0]), int(op.kernel.shape[1])
            if op.transpose:  # ONNX ConvTranspose weights: (c_in, c_out, kh, kw)
                weight = constant(f"w{index}", op.kernel.transpose(2, 3, 0, 1))
                nodes.append(
                    helper.make_node(
                        "ConvTranspose",
                        [name(op.input), weight, bias],
                        [pre],
                        kernel_shape=[kh, kw],
                        strides=[op.stride, op.stride],
                    )
                )
            else:  # ONNX Conv weights: (c_out, c_in, kh, kw)
                weight = constant(f"w{index}", op.kernel.transpose(3, 2, 0, 1))
                pads = [kh // 2, kw // 2, kh // 2, kw // 2]
                nodes.append(
                    helper.make_node(
                        "Conv",
                        [name(op.input), weight, bias],
                        [pre],
                        kernel_shape=[kh, kw],
                        strides=[op.stride, op.stride],
                        pads=pads,
                    )
                )
            if op.activation != "linear":
                activation(op.activation, pre, out)
        elif isinstance(op, MaxPool):
            nodes.append(
                helper.make_node(
                    "MaxPool", [name(op.input)], [out], kernel_shape=[op.size, op.size], strides=[op.size, op.size]
                )
            )
        elif isinstance(op, Concat):
            nodes.append(helper.make_node("Concat", [name(i) for i in op.inputs], [out], axis=1))
        elif isinstance(op, Add | Multiply):
            kind = "Add" if isinstance(op, Add) else "Mul"
            current = name(op.inputs[0])
            for position, other in enumerate(op.inputs[1:], start=1):
                target = out if position == len(op.inputs) - 1 else f"{out}__{position}"
                nodes.append(helper.make_node(kind, [current, name(other)], [target]))
                current = target
        elif isinstance(op, Activation):
            activation(op.kind, name(op.input), out)
        elif isinstance(op, Affine):
            channels = op.scale.shape[0]
            scale = constant(f"s{index}", op.scale.reshape(1, channels, 1, 1))
            shift = constant(f"t{index}", op.shift.reshape(1, channels, 1, 1))
            nodes.append(helper.make_node("Mul", [name(op.input), scale], [f"{out}__scaled"]))
            nodes.append(helper.make_node("Add", [f"{out}__scaled", shift], [out]))
    size = graph.input_size
    batch: int | str = batch_size if batch_size else "n"
    onnx_graph = helper.make_graph(
        nodes,
        "ichvol_folded",
        [helper.make_tensor_value_info(ONNX_INPUT, TensorProto.FLOAT, [batch, 1, size, size])],
        [helper.make_tensor_value_info(ONNX_OUTPUT, TensorProto.FLOAT, [batch, 1, size, size])],
        initializer=initializers,
    )
    model = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    model.ir_version = 8
    data: bytes = model.SerializeToString()
    return data


# --- the segmenter ----------------------------------------------------------------------------


def session_options(*, threads: int, spinning: bool = False) -> Any:
    """ONNX Runtime options for one inference process: ``threads`` intra-op threads (0: all cores).

    Threads do not spin while waiting (``spinning=False``): on a worker that shares its
    cores (decoding, post-processing, a second pool process) spinning cost a third more
    CPU time per slice for no speed.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = max(0, int(threads))
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return options


class OnnxSegmenter:
    """A folded model in ONNX Runtime behind the :class:`worker.model.weights.Segmenter` protocol.

    ``predict`` takes ``(n, S, S)`` float32 in [-1, 1] and returns ``(n, S, S)`` float32
    probabilities, running batches of ``batch_size`` slices (the last one smaller).
    """

    engine = "onnx"

    def __init__(self, onnx_model: bytes, info: ModelInfo, *, batch_size: int = 8, threads: int = 0) -> None:
        import onnxruntime as ort

        self._info = info
        self.batch_size = max(1, int(batch_size))
        self._session = ort.InferenceSession(
            onnx_model, sess_options=session_options(threads=threads), providers=["CPUExecutionProvider"]
        )

    @classmethod
    def from_keras(cls, model: Any, info: ModelInfo, *, batch_size: int = 8, threads: int = 0) -> OnnxSegmenter:
        return cls(graph_to_onnx(fold_keras_model(model)), info, batch_size=batch_size, threads=threads)

    @property
    def info(self) -> ModelInfo:
        return self._info

    def predict(self, images: F32) -> F32:
        size = self._info.input_size
        if images.ndim != 3 or images.shape[1:] != (size, size):
            raise ValueError(f"expected (n, {size}, {size}) images, got {images.shape}")
        n = int(images.shape[0])
        out = np.empty((n, size, size), dtype=np.float32)
        source = np.ascontiguousarray(images, dtype=np.float32)
        for start in range(0, n, self.batch_size):
            stop = min(start + self.batch_size, n)
            batch = source[start:stop].reshape(stop - start, 1, size, size)
            (probs,) = self._session.run([ONNX_OUTPUT], {ONNX_INPUT: batch})
            out[start:stop] = probs.reshape(stop - start, size, size)
        return out


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
    consumers = _consumers(graph.ops)
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


# --- choosing an engine -----------------------------------------------------------------------

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def _cpuinfo_field(key: str, cpuinfo: str | None) -> str:
    """The value of the first ``key : value`` line of ``cpuinfo`` (default: /proc/cpuinfo); empty if none."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
                cpuinfo = fh.read()
        except OSError:
            return ""
    for line in cpuinfo.splitlines():
        if line.startswith(key):
            return line.split(":", 1)[-1].strip()
    return ""


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bfloat16 natively (AMX-BF16 or AVX512-BF16), from /proc/cpuinfo."""
    flags = set(_cpuinfo_field("flags", cpuinfo).split())
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def cpu_vendor(cpuinfo: str | None = None) -> str:
    """``vendor_id`` from /proc/cpuinfo (``GenuineIntel``, ``AuthenticAMD``, ...); empty if unknown."""
    return _cpuinfo_field("vendor_id", cpuinfo)


def onnx_runtime_installed() -> bool:
    """Whether the ``onnx`` engine can run (the ``fast`` extra: onnxruntime and onnx)."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


def resolve_engine(
    engine: str, *, cpuinfo: str | None = None, gpu: bool = False, onnx_available: bool | None = None
) -> str:
    """The concrete engine for ``engine``; unknown names raise ValueError.

    ``auto``, from measurements on two CPUs (docs/performance.md): with a GPU running the
    model, ``folded``; on a CPU with bfloat16 units (AMX, AVX512-BF16), ``folded-bf16`` (2.7x
    ``model.predict`` on an Intel Xeon with AMX, where ONNX Runtime was slower); on an AMD CPU,
    ``onnx`` where ONNX Runtime is installed (1.3x ``folded`` at dims 32, 2.5x on the shipped
    dims-8 model, on an AMD EPYC, where oneDNN's float32 gains little); else ``folded``.
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
