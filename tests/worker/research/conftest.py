"""Research fixtures: a tiny BLAST-CT teacher.

Until branch ``teacher`` lands ``worker.measure.teacher`` and ``worker.model.blast_ct_net``,
a minimal stand-in with the same public names is installed here (tests only, never in
``worker/``): a small 3-D network on the HU windowed to [-15, 100], run on the native grid.
"""

from __future__ import annotations

import hashlib
import importlib
import sys
import types
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest


def _standin_modules() -> tuple[types.ModuleType, types.ModuleType]:
    teacher = types.ModuleType("worker.measure.teacher")
    net = types.ModuleType("worker.model.blast_ct_net")
    classes = ("background", "IPH", "EAH", "oedema", "IVH")

    @dataclass(frozen=True)
    class TeacherPrediction:
        probabilities: np.ndarray
        labels: np.ndarray
        model_names: tuple[str, ...]
        model_sha256: tuple[str, ...]

        @property
        def hemorrhage_probability(self) -> np.ndarray:
            p = self.probabilities
            return (p[1] + p[2] + p[4]).astype(np.float32)

    class BlastCtTeacher:
        def __init__(self, models: Any, names: tuple[str, ...], sha256: tuple[str, ...]) -> None:
            self.models, self.names, self.sha256 = list(models), tuple(names), tuple(sha256)

        @classmethod
        def from_keras(cls, models: Any, names: Any, sha256: Any) -> BlastCtTeacher:
            return cls(models, tuple(names), tuple(sha256))

    def load_teacher(models: Any = None, *, engine: str = "auto") -> BlastCtTeacher:
        raise RuntimeError("the stand-in teacher has no shipped models")

    def predict_teacher(series: Any, teacher: BlastCtTeacher) -> TeacherPrediction:
        x = np.clip((series.hu + 15.0) / 57.5 - 1.0, -1.0, 1.0).astype(np.float32)[None, ..., None]
        p = np.mean([np.asarray(m(x, training=False))[0] for m in teacher.models], axis=0)
        probabilities = np.moveaxis(p, -1, 0).astype(np.float32)
        labels = probabilities.argmax(axis=0).astype(np.uint8)
        return TeacherPrediction(probabilities, labels, teacher.names, teacher.sha256)

    def build_blast_ct(width: float = 1.0) -> Any:
        from worker.model import framework

        keras = framework.keras()
        channels = max(2, round(30 * width))
        inputs = keras.Input((None, None, None, 1))
        hidden = keras.layers.Conv3D(channels, 3, padding="same", activation="relu")(inputs)
        outputs = keras.layers.Conv3D(5, 1, activation="softmax")(hidden)
        return keras.Model(inputs, outputs)

    teacher.BLAST_CT_CLASSES = classes  # type: ignore[attr-defined]
    teacher.TeacherPrediction = TeacherPrediction  # type: ignore[attr-defined]
    teacher.BlastCtTeacher = BlastCtTeacher  # type: ignore[attr-defined]
    teacher.load_teacher = load_teacher  # type: ignore[attr-defined]
    teacher.predict_teacher = predict_teacher  # type: ignore[attr-defined]
    net.build_blast_ct = build_blast_ct  # type: ignore[attr-defined]
    return teacher, net


try:
    importlib.import_module("worker.measure.teacher")
    importlib.import_module("worker.model.blast_ct_net")
except ImportError:
    _teacher, _net = _standin_modules()
    sys.modules.setdefault("worker.measure.teacher", _teacher)
    sys.modules.setdefault("worker.model.blast_ct_net", _net)


@pytest.fixture(scope="session")
def tiny_teacher() -> Any:
    """BLAST-CT at a small width wrapped in memory (random weights: plumbing, not accuracy)."""
    from worker.measure import teacher
    from worker.model import blast_ct_net, framework

    framework.keras().utils.set_random_seed(7)
    model = blast_ct_net.build_blast_ct(width=0.1)
    sha = hashlib.sha256(b"tiny-teacher-7").hexdigest()
    return teacher.BlastCtTeacher.from_keras([model], ["tiny-blast-ct"], [sha])
