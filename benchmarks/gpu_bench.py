"""GPU throughput of DR-UNet: slices/s and studies/hour on whatever accelerator is present.

One prepared script for a GPU machine, where TensorFlow may be absent::

    KERAS_BACKEND=jax   python benchmarks/gpu_bench.py --json gpu.json
    KERAS_BACKEND=torch python benchmarks/gpu_bench.py --model drunet.keras
    python benchmarks/gpu_bench.py --backend tensorflow      # TensorFlow's own GPU build

It measures the paper's DR-UNet (dims 32, 256 x 256; random weights unless ``--model``
names a ``.keras`` file, e.g. the shipped weights) at several batch sizes, in float32 and
in mixed precision (``mixed_float16`` on CUDA, ``mixed_bfloat16`` elsewhere), with the
backend's own compiled predict step, after a warm-up. Studies per hour assume 32-slice
studies and add ``--cpu-stages-s`` seconds per study for the stages that stay on the
CPU (read, preprocess, postprocess, write; measured by ``benchmarks/run.py``).

Exception to "only worker/model/framework.py imports Keras": this standalone script picks the
Keras backend before Keras is imported, which the package's framework module (always
TensorFlow) cannot do. It builds the model with :func:`worker.model.networks.build_drunet` by
handing that function this Keras module instead of the framework's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _device(backend: str) -> str:
    try:
        if backend == "jax":
            import jax

            devices = jax.devices()
            return f"{devices[0].platform}: {getattr(devices[0], 'device_kind', devices[0])} (x{len(devices)})"
        if backend == "torch":
            import torch

            if torch.cuda.is_available():
                return f"cuda: {torch.cuda.get_device_name(0)} (x{torch.cuda.device_count()})"
            return "cpu"
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            return f"gpu: {tf.config.experimental.get_device_details(gpus[0]).get('device_name', gpus[0].name)}"
        return "cpu"
    except Exception as exc:  # report, do not fail the measurement
        return f"unknown ({exc})"


def _build(keras: Any, *, dims: int, size: int) -> Any:
    from worker.model import framework
    from worker.model import networks as model

    framework.keras = lambda: keras  # type: ignore[assignment]  # the backend chosen here, not TensorFlow
    return model.build_drunet(dims=dims, input_size=size)


def _rate(model: Any, *, batch: int, size: int, seconds: float) -> float:
    import numpy as np

    x = np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 1)).astype("float32")
    model.predict_on_batch(x)  # compile and warm up
    model.predict_on_batch(x)
    rates = []
    for _ in range(5):
        n, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds / 5:
            out = model.predict_on_batch(x)
            n += batch
        _ = float(np.asarray(out).ravel()[0])  # wait for the device
        rates.append(n / (time.perf_counter() - started))
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("jax", "torch", "tensorflow"), help="default: KERAS_BACKEND")
    parser.add_argument("--model", type=Path, help="a .keras file (default: a random DR-UNet)")
    parser.add_argument("--dims", type=int, default=32)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batches", default="8,32,64")
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring time per configuration")
    parser.add_argument("--study-slices", type=int, default=32)
    parser.add_argument("--cpu-stages-s", type=float, default=0.5, help="CPU-side seconds per study")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.backend:
        os.environ["KERAS_BACKEND"] = args.backend
    import keras

    if args.model is not None:  # the file's own architecture (read without any framework)
        from worker.model.weights import read_model_info

        info = read_model_info(args.model)
        args.dims, args.size = info.dims, info.input_size
    backend = keras.backend.backend()
    device = _device(backend)
    precisions = ["float32", "mixed_float16" if "cuda" in device or "gpu" in device else "mixed_bfloat16"]
    rows = []
    for precision in precisions:
        keras.mixed_precision.set_global_policy(precision)
        model = _build(keras, dims=args.dims, size=args.size)
        if args.model is not None:  # same architecture, the file's weights
            model.set_weights(keras.saving.load_model(args.model, compile=False).get_weights())
        size = int(model.input_shape[1])
        for batch in (int(b) for b in args.batches.split(",")):
            rate = _rate(model, batch=batch, size=size, seconds=args.seconds)
            per_study = args.study_slices / rate
            rows.append(
                {
                    "precision": precision,
                    "batch": batch,
                    "slices_per_s": rate,
                    "studies_per_hour_inference_only": 3600.0 / per_study,
                    "studies_per_hour": 3600.0 / (per_study + args.cpu_stages_s),
                }
            )
            print(
                f"{precision:15s} batch {batch:3d}: {rate:8.1f} slices/s, "
                f"{3600.0 / per_study:8.0f} studies/h (inference)"
            )
    keras.mixed_precision.set_global_policy("float32")
    report = {"backend": backend, "device": device, "host": platform.node(), "dims": args.dims, "size": args.size}
    report["rows"] = rows
    best = max(rows, key=lambda r: r["slices_per_s"])
    print(
        f"\n{device}, Keras {keras.__version__} ({backend}): best {best['slices_per_s']:.0f} slices/s "
        f"({best['precision']}, batch {best['batch']}) = {best['studies_per_hour']:.0f} studies/hour of "
        f"{args.study_slices} slices with {args.cpu_stages_s} s of CPU stages each"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
