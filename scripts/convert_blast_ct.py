"""Convert the BLAST-CT PyTorch weights (legacy ``torch.save`` state dicts) to the project's ``.npz``.

Run once; nothing at run time imports torch. The BLAST-CT files are in torch's legacy
(pre-zip) format, which :func:`read_legacy_state` reads without torch (it reproduces the
torch-converted shipped files exactly); zip-format files need the ``convert`` extra (torch)::

    python scripts/convert_blast_ct.py ../shared/data/blast-ct-models worker/weights/blast_ct \\
        --models model_1 model_2 model_3

For each ``<name>.pt`` it writes ``<name>.npz``: one array per weight, named after the Keras
layer of :func:`worker.model.blast_ct_net.build_blast_ct` (the state-dict name with the pathway
prefix ``path(5, 5, 5)0.path.`` shortened to ``path0.``), in Keras layout (convolution kernels
``(kd, kh, kw, in, out)``). Convolution kernels are stored as float16 (halves the size; the
conversion test measures the effect), BatchNorm statistics and PReLU slopes as float32.
``num_batches_tracked`` (training bookkeeping) is dropped. It then writes ``manifest.json``
and ``SHA256SUMS`` for every ``.npz`` in the output folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

PATH_PREFIX = re.compile(r"^path\(\d+, \d+, \d+\)(\d+)\.path\.")


def keras_name(torch_name: str) -> str:
    """``path(5, 5, 5)0.path.1.conv.weight`` -> ``path0.1.conv.weight``; fully connected names unchanged."""
    return PATH_PREFIX.sub(r"path\1.", torch_name)


def convert_state_dict(state: dict[str, np.ndarray], *, conv_dtype: type = np.float16) -> dict[str, np.ndarray]:
    """Named arrays in Keras layout from a state dict already turned into NumPy arrays."""
    out: dict[str, np.ndarray] = {}
    for name, value in state.items():
        if name.endswith("num_batches_tracked"):
            continue
        array = np.asarray(value, dtype=np.float32)
        if name.endswith("conv.weight"):  # torch (out, in, kd, kh, kw) -> keras (kd, kh, kw, in, out)
            array = array.transpose(2, 3, 4, 1, 0).astype(conv_dtype)
        out[keras_name(name)] = np.ascontiguousarray(array)
    return out


def load_torch_state(path: Path) -> dict[str, np.ndarray]:
    """The state dict as NumPy arrays: legacy files (BLAST-CT's) without torch, others with it."""
    with open(path, "rb") as f:
        legacy = not f.read(2).startswith(b"PK")  # the zip format of torch >= 1.6 starts with "PK"
    if legacy:
        return read_legacy_state(path)
    import torch  # the convert extra only

    state = torch.load(path, map_location="cpu", weights_only=True)
    return {name: tensor.detach().cpu().numpy() for name, tensor in state.items()}


LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
TORCH_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _Storage:
    """A storage named in the pickle; its bytes are read after it."""

    def __init__(self, dtype: type, numel: int) -> None:
        self.dtype, self.numel = np.dtype(dtype), numel
        self.data: np.ndarray = np.empty(0, dtype=self.dtype)


class _Tensor:
    """A tensor as the pickle describes it: a strided view of a storage."""

    def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def array(self) -> np.ndarray:
        data = self.storage.data
        item = data.itemsize
        view = np.lib.stride_tricks.as_strided(
            data[self.offset :], shape=self.size, strides=tuple(s * item for s in self.stride)
        )
        return np.array(view)


def _rebuild(storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...], *rest: Any) -> _Tensor:
    """Stands in for ``torch._utils._rebuild_tensor_v2``."""
    return _Tensor(storage, offset, size, stride)


def read_legacy_state(path: Path) -> dict[str, np.ndarray]:
    """A legacy (pre-zip) ``torch.save`` state dict as NumPy arrays, without torch.

    The format: four pickles (magic number, protocol, system info, the state dict whose
    tensors name their storages by persistent id), the list of storage keys, then each
    storage as an int64 element count and its raw little-endian bytes. Only what a state
    dict of plain tensors holds is accepted; anything else is refused, never executed.
    """
    storages: dict[str, _Storage] = {}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                return _rebuild
            if (module, name) == ("collections", "OrderedDict"):
                return OrderedDict
            if module == "torch" and name in TORCH_DTYPES:
                return TORCH_DTYPES[name]
            raise pickle.UnpicklingError(f"unexpected {module}.{name} in a state dict")

        def persistent_load(self, pid: Any) -> _Storage:
            kind, dtype, key, _location, numel, *_ = pid
            if kind != "storage":
                raise pickle.UnpicklingError(f"unexpected persistent id {kind!r}")
            return storages.setdefault(str(key), _Storage(dtype, int(numel)))

    with open(path, "rb") as f:
        if pickle.load(f) != LEGACY_MAGIC:
            raise ValueError(f"{path} is not a legacy torch.save file")
        pickle.load(f)  # protocol version
        pickle.load(f)  # system info
        state = Unpickler(f).load()
        keys = pickle.load(f)
        for key in keys:
            storage = storages[str(key)]
            numel = int(np.frombuffer(f.read(8), dtype="<i8")[0])
            storage.data = np.frombuffer(f.read(numel * storage.dtype.itemsize), dtype=storage.dtype)
    return {name: t.array() for name, t in state.items()}


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_manifest(out_dir: Path, source: str, source_dir: Path) -> None:
    files = sorted(out_dir.glob("model_*.npz"), key=lambda p: int(p.stem.split("_")[1]))
    models = []
    for p in files:
        original = source_dir / f"{p.stem}.pt"
        entry = {"name": p.stem, "file": p.name, "sha256": sha256_of(p)}
        if original.is_file():
            entry["converted_from"] = original.name
            entry["converted_from_sha256"] = sha256_of(original)
        models.append(entry)
    manifest = {
        "network": "BLAST-CT DeepMedic (worker.model.blast_ct_net)",
        "classes": ["background", "IPH", "EAH", "oedema", "IVH"],
        "source": source,
        "format": "npz, convolution kernels float16 (Keras layout), BatchNorm and PReLU float32",
        "licence": "Apache-2.0 (LICENSE.txt)",
        "models": models,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (out_dir / "SHA256SUMS").write_text("".join(f"{m['sha256']}  {m['file']}\n" for m in models))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="folder with model_<n>.pt")
    parser.add_argument("out", type=Path, help="output folder (worker/weights/blast_ct)")
    parser.add_argument("--models", nargs="+", default=["model_1"], help="which models (default: model_1)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        arrays = convert_state_dict(load_torch_state(args.source / f"{name}.pt"))
        np.savez_compressed(args.out / f"{name}.npz", **arrays)  # type: ignore[arg-type]
        print(f"{name}: {len(arrays)} arrays, {(args.out / f'{name}.npz').stat().st_size / 1e6:.2f} MB")
    write_manifest(args.out, "biomedia-mira/blast-ct commit 96666a1 (unchanged up to 361e8c7)", args.source)


if __name__ == "__main__":
    main()
