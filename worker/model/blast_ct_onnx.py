"""The BLAST-CT network as an ONNX graph built from its named arrays, run in ONNX Runtime (no TensorFlow).

The same network as :func:`worker.model.blast_ct_net.build_blast_ct`, written with the
``onnx`` helpers straight from the ``.npz`` arrays (Keras layout, see
``scripts/convert_blast_ct.py``): BatchNorm as a per-channel multiply-add, PReLU, valid 3-D
convolutions, centre crops and subsampling as ``Slice``, nearest upsampling as ``Resize``
(``asymmetric``/``floor``: each voxel repeated), concatenation, softmax. The graph is NCDHW:
input ``ct`` ``(1, 1, S, S, S)``, output ``probabilities`` ``(1, 5, O, O, O)``. Channel counts
are read from the arrays, so tiny test networks convert too. ``onnx`` and ``onnxruntime`` (the
``fast`` extra) are imported when a graph is built or run.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from worker.model.blast_ct_net import (
    BN_EPSILON,
    FEATURE_MAPS,
    SCALE_FACTORS,
    output_size_for,
    path_input_size,
)
from worker.model.onnx_engine import ONNX_OPSET, session_options

ONNX_INPUT = "ct"
ONNX_OUTPUT = "probabilities"


def blast_ct_onnx(arrays: dict[str, np.ndarray], *, input_size: int) -> bytes:
    """The serialised ONNX model of the network whose weights are ``arrays``, for ``input_size``^3 patches."""
    from onnx import TensorProto, helper, numpy_helper

    nodes: list[Any] = []
    initializers: list[Any] = []
    counter = [0]

    def fresh(label: str) -> str:
        counter[0] += 1
        return f"{label}_{counter[0]}"

    def const(label: str, values: npt.NDArray[Any]) -> str:
        name = fresh(label)
        initializers.append(numpy_helper.from_array(np.ascontiguousarray(values), name))
        return name

    def ints(label: str, values: list[int]) -> str:
        return const(label, np.asarray(values, dtype=np.int64))

    def crop(x: str, size: int, current: int, *, step: int = 1, offset: int = 0) -> str:
        start = current // 2 - size // 2 + offset
        out = fresh("crop")
        nodes.append(
            helper.make_node(
                "Slice",
                [x, ints("s", [start] * 3), ints("e", [start + size] * 3), ints("a", [2, 3, 4]), ints("p", [step] * 3)],
                [out],
            )
        )
        return out

    def block(x: str, name: str, kernel: int) -> tuple[str, int]:
        gamma = arrays[f"{name}.bn.weight"].astype(np.float32)
        scale = gamma / np.sqrt(arrays[f"{name}.bn.running_var"].astype(np.float32) + BN_EPSILON)
        shift = arrays[f"{name}.bn.bias"].astype(np.float32) - arrays[f"{name}.bn.running_mean"] * scale
        shape = (1, -1, 1, 1, 1)
        a, b, p, c = fresh("bn_mul"), fresh("bn_add"), fresh("prelu"), fresh("conv")
        nodes.append(helper.make_node("Mul", [x, const("scale", scale.reshape(shape).astype(np.float32))], [a]))
        nodes.append(helper.make_node("Add", [a, const("shift", shift.reshape(shape).astype(np.float32))], [b]))
        slope = arrays[f"{name}.prelu.weight"].astype(np.float32).reshape(1)
        nodes.append(helper.make_node("PRelu", [b, const("slope", slope)], [p]))
        kernel_keras = arrays[f"{name}.conv.weight"].astype(np.float32)  # (kd, kh, kw, in, out)
        weight = kernel_keras.transpose(4, 3, 0, 1, 2)
        nodes.append(helper.make_node("Conv", [p, const("w", weight)], [c]))
        cin, cout = weight.shape[1], weight.shape[0]
        if cin == cout:
            h = kernel // 2
            shortcut = x
            if h:
                shortcut = fresh("shortcut")
                nodes.append(
                    helper.make_node(
                        "Slice", [x, ints("s", [h] * 3), ints("e", [-h] * 3), ints("a", [2, 3, 4])], [shortcut]
                    )
                )
            out = fresh("res")
            nodes.append(helper.make_node("Add", [c, shortcut], [out]))
            return out, cout
        return c, cout

    out_size = output_size_for(input_size)
    paths = []
    for p, scale in enumerate(SCALE_FACTORS):
        size = path_input_size(scale, out_size)
        x = crop(ONNX_INPUT, size, input_size) if size != input_size else ONNX_INPUT
        if scale > 1:
            sub = fresh("sub")
            nodes.append(
                helper.make_node(
                    "Slice",
                    [
                        x,
                        ints("s", [scale // 2] * 3),
                        ints("e", [size] * 3),
                        ints("a", [2, 3, 4]),
                        ints("p", [scale] * 3),
                    ],
                    [sub],
                )
            )
            x = sub
        for i in range(len(FEATURE_MAPS)):
            x, _ = block(x, f"path{p}.{i + 1}", 3)
        coarse = out_size // scale + bool(out_size % scale)
        current = coarse
        if scale > 1:
            up = fresh("up")
            scales = const("scales", np.asarray([1, 1, scale, scale, scale], dtype=np.float32))
            nodes.append(
                helper.make_node(
                    "Resize",
                    [x, "", scales],
                    [up],
                    mode="nearest",
                    coordinate_transformation_mode="asymmetric",
                    nearest_mode="floor",
                )
            )
            x, current = up, coarse * scale
        paths.append(crop(x, out_size, current) if current != out_size else x)
    x = fresh("concat")
    nodes.append(helper.make_node("Concat", paths, [x], axis=1))
    i = 0
    while f"fully_connected.{i}.conv.weight" in arrays:
        x, _ = block(x, f"fully_connected.{i}", 1)
        i += 1
    nodes.append(helper.make_node("Softmax", [x], [ONNX_OUTPUT], axis=1))
    graph = helper.make_graph(
        nodes,
        "blast_ct",
        [helper.make_tensor_value_info(ONNX_INPUT, TensorProto.FLOAT, [1, 1, input_size, input_size, input_size])],
        [helper.make_tensor_value_info(ONNX_OUTPUT, TensorProto.FLOAT, [1, 5, out_size, out_size, out_size])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    serialised: bytes = model.SerializeToString()
    return serialised


class OnnxBlastCt:
    """One BLAST-CT model in ONNX Runtime, called like the Keras model on NDHWC patches.

    ``input_shape`` mimics Keras' (``(None, S, S, S, 1)``) so :class:`worker.measure.teacher.BlastCtTeacher`
    can read the patch size from it.
    """

    def __init__(self, arrays: dict[str, np.ndarray], *, input_size: int, threads: int = 0) -> None:
        import onnxruntime as ort

        self.input_shape = (None, input_size, input_size, input_size, 1)
        options = session_options(threads=threads)
        # Denormal floats stall this network on CPUs (BLAST-CT's README: 90 minutes a scan in
        # PyTorch without flushing them); ONNX Runtime flushes them only when asked.
        options.add_session_config_entry("session.set_denormal_as_zero", "1")
        self._session = ort.InferenceSession(
            blast_ct_onnx(arrays, input_size=input_size),
            sess_options=options,
            providers=["CPUExecutionProvider"],
        )

    def predict_patch(self, patch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """``(1, S, S, S, 1)`` windowed patch -> ``(1, O, O, O, 5)`` class probabilities."""
        x = np.ascontiguousarray(np.moveaxis(patch, -1, 1), dtype=np.float32)
        (probs,) = self._session.run([ONNX_OUTPUT], {ONNX_INPUT: x})
        return np.ascontiguousarray(np.moveaxis(probs, 1, -1), dtype=np.float32)
