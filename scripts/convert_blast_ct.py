"""Convert the BLAST-CT PyTorch weights (legacy ``torch.save`` state dicts) to the project's ``.npz``.

Run once, with the ``convert`` extra (torch) installed; nothing at run time imports torch::

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
import re
from pathlib import Path

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
    import torch  # the convert extra only

    state = torch.load(path, map_location="cpu", weights_only=True)
    return {name: tensor.detach().cpu().numpy() for name, tensor in state.items()}


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
