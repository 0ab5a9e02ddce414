"""Model throughput per inference engine, the machine's matrix-product peak, and the seed's path.

Run by :mod:`benchmarks.run` in a subprocess (threads are fixed at start)::

    python -m benchmarks.model_bench --model M.keras --slices 32 --rounds 5 --threads 2 \\
        --engines keras-predict,keras,folded,folded-bf16,onnx --peak --json out.json

Engines: ``keras-predict`` is the plain ``model.predict`` path (the baseline of the
targets); the others are :func:`worker.model.engines.load_segmenter` engines. Every engine sees
the same ``(slices, S, S)`` float32 input in [-1, 1]; rounds are interleaved
(:func:`benchmarks.common.time_rounds`). ``--seed-study DIR`` also times the seed's own
processing path against ours on the same slices (see :func:`seed_path`).
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import peak_rss_mb, time_rounds, write_json

SEED_SIDE = 1440  # the seed resizes every image to 1440 x 1440


def matmul_peak(*, n: int, rounds: int) -> dict[str, float]:
    """GFLOP/s of one ``n x n`` matrix product: TensorFlow float32 and bfloat16 (oneDNN), numpy float32."""
    from worker.model import framework

    tf = framework.tf()
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    flop = 2.0 * n**3
    ta, tb = tf.constant(a), tf.constant(b)
    ba, bb = tf.cast(ta, tf.bfloat16), tf.cast(tb, tf.bfloat16)
    mm = tf.function(lambda x, y: tf.reduce_sum(tf.cast(tf.linalg.matmul(x, y)[:1, :1], tf.float32)))
    timings = time_rounds(
        {
            "tf_float32": lambda: mm(ta, tb).numpy(),
            "tf_bfloat16": lambda: mm(ba, bb).numpy(),
            "numpy_float32": lambda: a @ b,
        },
        rounds=rounds,
    )
    return {name: flop / t.wall_s / 1e9 for name, t in timings.items()}


def _engine_runner(
    name: str, model_path: Path, *, batch_size: int, threads: int, images: np.ndarray
) -> Callable[[], object]:
    from worker.model.engines import load_segmenter
    from worker.model.networks import load_keras_model

    if name == "keras-predict":
        model = load_keras_model(model_path)
        nhwc = images[..., None]
        return lambda: model.predict(nhwc, batch_size=batch_size, verbose=0)
    segmenter = load_segmenter(model_path, batch_size=batch_size, engine=name, threads=threads)
    actual = getattr(segmenter, "engine", "keras")
    if actual != name:
        raise RuntimeError(f"asked for engine {name}, got {actual}")
    return lambda: segmenter.predict(images)


def seed_path(hu: np.ndarray, model: Any, *, window: tuple[float, float], size: int, batch_size: int) -> int:
    """The seed's processing path on HU slices ``(n, rows, columns)``; returns the mask pixels at 1440.

    As the seed does it: each slice windowed to 8 bits and resized to 1440 x 1440, then to
    the model input; the model called eagerly (``model(x)``) per batch; each probability map
    resized back to 1440, thresholded, its contours found and drawn on a colour copy of the
    1440 image with OpenCV, slice by slice. (Written from that description; no code of the
    authors is used.)
    """
    import cv2

    low, high = window
    eight_bit = np.clip((hu - low) * (255.0 / (high - low)), 0, 255).astype(np.uint8)
    total = 0
    for start in range(0, hu.shape[0], batch_size):
        large = [
            cv2.resize(img, (SEED_SIDE, SEED_SIDE), interpolation=cv2.INTER_LINEAR)
            for img in eight_bit[start : start + batch_size]
        ]
        batch = np.stack([cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA) for img in large])
        batch = batch.astype(np.float32)[..., None] / 127.5 - 1.0
        probabilities = np.asarray(model(batch, training=False))
        for prob, img in zip(probabilities, large, strict=True):
            mask = cv2.resize(prob[..., 0], (SEED_SIDE, SEED_SIDE), interpolation=cv2.INTER_LINEAR) > 0.5
            contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            colour = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
            cv2.drawContours(colour, contours, -1, (0, 0, 255), 2)
            total += int(mask.sum())
    return total


def our_path(series: Any, segmenter: Any, out_png: Path) -> float:
    """Our path on the same slices: preprocess, inference, post-processing, volume, overlay picture."""
    from worker.measure import postprocess, volume
    from worker.model import preprocess
    from worker.outputs import overlay

    info = segmenter.info
    images, fit = preprocess.to_model_input(series.hu, size=info.input_size, window=info.hu_window)
    probabilities = preprocess.to_native(segmenter.predict(images), fit)
    mask = postprocess.binarize(probabilities, threshold=0.5)
    mask &= postprocess.intracranial_mask(series.hu, pixel_spacing_mm=series.pixel_spacing_mm)
    mask = postprocess.remove_small_components(
        mask, pixel_spacing_mm=series.pixel_spacing_mm, slab_thickness_mm=series.slab_thickness_mm, min_volume_ml=0.05
    )
    volume_ml = volume.planimetric_volume_ml(
        mask, pixel_spacing_mm=series.pixel_spacing_mm, slab_thickness_mm=series.slab_thickness_mm
    )
    overlay.write_overlay_png(
        out_png,
        hu=series.hu,
        mask=mask,
        volume_ml=volume_ml,
        abc2_ml=0.0,
        positions_mm=[s.position_mm for s in series.slices],
    )
    return float(volume_ml)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--engines", default="keras-predict,keras,folded,folded-bf16,onnx")
    parser.add_argument("--peak", action="store_true", help="measure the matrix-product peak too")
    parser.add_argument("--peak-n", type=int, default=2048)
    parser.add_argument("--seed-study", type=Path, help="time the seed's path against ours on this study")
    parser.add_argument("--ours-engine", default="folded-bf16")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)

    from worker.model import framework
    from worker.model.fold import fold_keras_model
    from worker.model.networks import load_keras_model
    from worker.model.weights import read_model_info

    framework.set_threads(args.threads)
    info = read_model_info(args.model)
    size = info.input_size
    images = np.random.default_rng(1).uniform(-1.0, 1.0, (args.slices, size, size)).astype(np.float32)
    result: dict[str, Any] = {
        "input_size": size,
        "dims": info.dims,
        "slices": args.slices,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "flops_per_slice": fold_keras_model(load_keras_model(args.model)).flops_per_slice(),
    }
    if args.peak:
        result["matmul_gflops"] = matmul_peak(n=args.peak_n, rounds=max(3, args.rounds))
    engines = [e for e in args.engines.split(",") if e]
    if engines:
        runners = {
            name: _engine_runner(name, args.model, batch_size=args.batch_size, threads=args.threads, images=images)
            for name in engines
        }
        timings = time_rounds(runners, rounds=args.rounds)
        result["engines"] = {name: t.to_json() for name, t in timings.items()}
    if args.seed_study:
        from worker.imaging.dicom_load import load_study
        from worker.imaging.series_selection import SelectionRules
        from worker.model.engines import load_segmenter

        series = load_study(args.seed_study, rules=SelectionRules())
        model = load_keras_model(args.model)
        ours = load_segmenter(args.model, batch_size=args.batch_size, engine=args.ours_engine, threads=args.threads)
        with tempfile.TemporaryDirectory() as tmp:
            png = Path(tmp) / "overlay.png"
            timings = time_rounds(
                {
                    "seed": lambda: seed_path(
                        series.hu, model, window=info.hu_window, size=size, batch_size=args.batch_size
                    ),
                    "ours": lambda: our_path(series, ours, png),
                },
                rounds=max(1, args.rounds // 2),
            )
        result["seed_comparison"] = {
            "slices": int(series.hu.shape[0]),
            "native": list(series.hu.shape[1:]),
            "ours_engine": args.ours_engine,
            **{name: t.to_json() for name, t in timings.items()},
        }
    result["peak_rss_mb"] = peak_rss_mb()
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
