"""Shared pieces of the benchmarks: the benchmark models and studies, timing, subprocess JSON.

Each measurement that loads TensorFlow runs in a subprocess of its own (``python -m
benchmarks.<module> ... --json OUT``), so thread settings, peak memory and start-up
costs belong to that measurement alone; the parent (:mod:`benchmarks.run`) only
orchestrates and prints.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

PYTHON = sys.executable


@dataclass(frozen=True)
class Timing:
    """Medians over rounds: wall seconds and process CPU seconds (all threads) per round."""

    wall_s: float
    cpu_s: float
    rounds: int

    def to_json(self) -> dict[str, float]:
        return {"wall_s": self.wall_s, "cpu_s": self.cpu_s, "rounds": self.rounds}


def time_rounds(candidates: dict[str, Callable[[], object]], *, rounds: int) -> dict[str, Timing]:
    """Run every candidate once to warm up, then ``rounds`` times each, interleaved; medians.

    Interleaving (A B C A B C ...) spreads a shared machine's load over all candidates
    alike, so their ratios stay meaningful when the absolute figures move.
    """
    for run in candidates.values():
        run()
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, run in candidates.items():
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            samples[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {
        name: Timing(
            wall_s=statistics.median(s[0] for s in values),
            cpu_s=statistics.median(s[1] for s in values),
            rounds=rounds,
        )
        for name, values in samples.items()
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory (MB): ``VmHWM`` of /proc/self/status.

    Not ``getrusage``: Linux carries ``ru_maxrss`` over from the parent through fork and
    exec, so a child of a large parent would report the parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(data, indent=1, sort_keys=True))


def run_json(
    module: str, args: list[str], *, out: Path, env: dict[str, str] | None = None, timeout_s: float = 1800
) -> dict[str, Any]:
    """``python -m benchmarks.<module> ARGS --json OUT`` in a subprocess; its JSON, with ``process_wall_s``."""
    started = time.perf_counter()
    proc = subprocess.run(
        [PYTHON, "-m", f"benchmarks.{module}", *args, "--json", str(out)],
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"benchmarks.{module} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    data: dict[str, Any] = json.loads(out.read_text())
    data["process_wall_s"] = time.perf_counter() - started
    return data


def make_bench_model(path: Path, *, dims: int, input_size: int, seed: int = 0) -> Path:
    """An untrained DR-UNet saved with metadata, its BatchNorm statistics randomised.

    Random weights are fine for speed. The BatchNorm statistics are drawn away from the
    identity (so the folding does real work), and the head's bias is set low so that the
    masks are sparse, as on real scans: post-processing and outputs then cost what they
    cost in practice rather than what a half-filled random mask would.
    """
    import numpy as np

    from worker.model import framework
    from worker.model.networks import build_drunet, save_model
    from worker.model.weights import ModelInfo

    keras = framework.keras()
    rng = np.random.default_rng(seed)
    model = build_drunet(dims=dims, input_size=input_size)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, gamma.shape).astype(np.float32),
                    rng.normal(0.0, 0.1, beta.shape).astype(np.float32),
                    rng.normal(0.0, 0.1, mean.shape).astype(np.float32),
                    rng.uniform(0.5, 2.0, var.shape).astype(np.float32),
                ]
            )
    head = model.get_layer("hematoma")
    kernel, bias = head.get_weights()
    head.set_weights([kernel, np.full_like(bias, -4.0)])
    info = ModelInfo(
        name="DR-UNet",
        architecture="drunet",
        dims=dims,
        input_size=input_size,
        hu_window=(0.0, 80.0),
        version=f"bench-random-d{dims}-{input_size}",
        training_data="none: random weights, for speed measurements only",
    )
    return save_model(model, path, info)


def make_study(study_dir: Path, *, size: int, n_slices: int, seed: int = 7) -> Path:
    """A phantom head CT study (DICOM) with one hematoma: ``n_slices`` of ``size x size``, 5 mm."""
    from worker.synth.phantom import LesionSpec, PhantomSpec, generate_study

    if (study_dir / "truth").is_dir():
        return study_dir
    spacing = 0.45 * 512 / size
    spec = PhantomSpec(
        rows=size,
        columns=size,
        pixel_spacing_mm=(spacing, spacing),
        slice_thickness_mm=5.0,
        n_slices=n_slices,
        lesions=(LesionSpec("random"),),
    )
    generate_study(study_dir, spec=spec, seed=seed)
    return study_dir
