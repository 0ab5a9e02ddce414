"""The folded graph in ONNX Runtime: a quarter of TensorFlow's memory, about its float32 speed.

:func:`graph_to_onnx` writes a :class:`~worker.model.fold.FoldedGraph` as ONNX with the
``onnx`` helpers (no tf2onnx); :class:`OnnxSegmenter` runs it. The ONNX graph is NCHW
(``(n, 1, S, S)``), so the pipeline's ``(n, S, S)`` slices go in by a reshape. ONNX
Runtime and ``onnx`` (the ``fast`` extra) are imported when a graph is written or a
session is built.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from worker.model.fold import Activation, Add, Affine, Concat, Conv, FoldedGraph, MaxPool, Multiply, fold_keras_model
from worker.model.weights import ModelInfo

F32 = npt.NDArray[np.float32]

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
