"""The torch-free reader of BLAST-CT's legacy ``torch.save`` files (``scripts/convert_blast_ct.py``).

Runs without torch: the shipped weights were converted with torch, so reading the originals
without it must give exactly the same arrays.
"""

from __future__ import annotations

import importlib.util
import io
import os
import pickle
import sys
import types
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import REPO_ROOT, SHARED_DATA

SHIPPED = REPO_ROOT / "worker" / "weights" / "blast_ct"


def _converter() -> Any:
    spec = importlib.util.spec_from_file_location("convert_blast_ct", REPO_ROOT / "scripts" / "convert_blast_ct.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["model_1", "model_2", "model_3"])
def test_read_without_torch_the_originals_give_the_shipped_arrays_exactly(name: str) -> None:
    source = SHARED_DATA / "blast-ct-models" / f"{name}.pt"
    if not source.is_file():
        pytest.skip(f"the BLAST-CT originals are absent: expected {source}")
    convert = _converter()
    arrays = convert.convert_state_dict(convert.load_torch_state(source))
    with np.load(SHIPPED / f"{name}.npz") as shipped:
        assert set(shipped.files) == set(arrays)
        for key in shipped.files:
            assert shipped[key].dtype == arrays[key].dtype and np.array_equal(shipped[key], arrays[key]), key


def _legacy_file(path: Path, state: object, storages: dict[str, np.ndarray]) -> Path:
    """A legacy ``torch.save`` file written by hand: 4 pickles, the storage keys, the raw storages."""
    convert = _converter()
    with open(path, "wb") as f:
        for header in (convert.LEGACY_MAGIC, 1001, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        f.write(state if isinstance(state, bytes) else pickle.dumps(state, protocol=2))
        pickle.dump(list(storages), f, protocol=2)
        for data in storages.values():
            f.write(np.int64(data.size).tobytes() + data.tobytes())
    return path


def _state_dict_pickle(monkeypatch: pytest.MonkeyPatch) -> bytes:
    """``{"w": <a float tensor of size (2, 2), stride (1, 3), offset 1 into storage "0">}`` pickled as
    ``torch.save`` pickles it (the same globals and persistent id), with stand-ins for torch."""
    fake_torch, fake_utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args: Any) -> None: ...

    class FloatStorage: ...

    _rebuild_tensor_v2.__module__, FloatStorage.__module__ = "torch._utils", "torch"
    _rebuild_tensor_v2.__qualname__, FloatStorage.__qualname__ = "_rebuild_tensor_v2", "FloatStorage"
    fake_utils._rebuild_tensor_v2 = _rebuild_tensor_v2  # type: ignore[attr-defined]
    fake_torch.FloatStorage = FloatStorage  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    monkeypatch.setitem(sys.modules, "torch._utils", fake_utils)
    storage = object()

    class Tensor:
        def __reduce__(self) -> Any:
            return _rebuild_tensor_v2, (storage, 1, (2, 2), (1, 3), False, OrderedDict())

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: Any) -> Any:
            return ("storage", FloatStorage, "0", "cpu", 8, None) if obj is storage else None

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump(OrderedDict([("w", Tensor())]))
    return buffer.getvalue()


class _Evil:
    def __reduce__(self) -> Any:
        return os.system, ("true",)


def test_a_strided_tensor_is_rebuilt_and_anything_but_tensors_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    convert = _converter()
    body = _state_dict_pickle(monkeypatch)
    storage = np.arange(8, dtype="<f4")
    state = convert.read_legacy_state(_legacy_file(tmp_path / "ok.pt", body, {"0": storage}))
    np.testing.assert_array_equal(state["w"], [[1.0, 4.0], [2.0, 5.0]])  # element (i, j) = storage[1 + i + 3 j]
    evil = pickle.dumps(_Evil(), protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="unexpected"):
        convert.read_legacy_state(_legacy_file(tmp_path / "evil.pt", evil, {}))
    (tmp_path / "other.pt").write_bytes(pickle.dumps(1234) + b"rest")
    with pytest.raises(ValueError, match=r"not a legacy torch\.save file"):
        convert.read_legacy_state(tmp_path / "other.pt")
