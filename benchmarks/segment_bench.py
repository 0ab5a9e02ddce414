"""One study through the pipeline, per stage: ``ichvol segment`` cold, and a warm worker's view.

* :func:`cli_segment` (no TensorFlow in the caller) runs ``ichvol segment STUDY --out OUT``
  as a user does, in a fresh process, and returns the stage timings of its ``result.json``
  (``read``, ``preprocess``, ``inference``, ``postprocess``, ``write``, ``load_model``)
  and the process's wall time (Python and TensorFlow start-up included).
* ``python -m benchmarks.segment_bench --model M --engine E --study S --rounds R --json OUT``
  loads the segmenter once, as a worker process does, then measures the same study
  ``R`` times with :func:`worker.measure.pipeline.segment_study` (medians per stage) and reports
  the process's peak resident memory: the worker-memory figure of the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO_ROOT, peak_rss_mb, write_json

STAGES = ("read", "preprocess", "inference", "postprocess", "write")


def cli_segment(*, study: Path, model: Path, engine: str, threads: int, out_dir: Path) -> dict[str, Any]:
    """``ichvol segment`` in a fresh process; ``result.json``'s timings plus ``process_wall_s``."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("ICHVOL_")},
        "ICHVOL_MODEL": str(model),
        "ICHVOL_INFERENCE_ENGINE": engine,
        "ICHVOL_INFERENCE_THREADS": str(threads),
    }
    started = time.perf_counter()
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "ichvol"), "segment", str(study), "--out", str(out_dir)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"ichvol segment failed ({proc.returncode}): {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
    result = json.loads((out_dir / "result.json").read_text())
    return {"timings_s": result["timings_s"], "process_wall_s": wall, "volume_ml": result["volume_ml"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--engine", default="keras")
    parser.add_argument("--study", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)

    from worker.measure.pipeline import segment_study
    from worker.model import framework
    from worker.model.engines import load_segmenter

    framework.set_threads(args.threads)
    started = time.perf_counter()
    segmenter = load_segmenter(args.model, batch_size=args.batch_size, engine=args.engine, threads=args.threads)
    load_s = time.perf_counter() - started
    rss_after_load = peak_rss_mb()
    samples: list[dict[str, float]] = []
    volume_ml = None
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(args.rounds):
            outcome = segment_study(study_dir=args.study, out_dir=Path(tmp) / f"out{index}", segmenter=segmenter)
            if not outcome.ok:
                raise RuntimeError(f"segment_study failed: {outcome.result.get('reason')}")
            samples.append({stage: float(outcome.result["timings_s"][stage]) for stage in STAGES})
            volume_ml = outcome.volume_ml
    stages = {stage: statistics.median(s[stage] for s in samples) for stage in STAGES}
    totals = [sum(s.values()) for s in samples]
    write_json(
        args.json,
        {
            "engine": getattr(segmenter, "engine", "keras"),
            "load_s": load_s,
            "stages_s": stages,
            "total_s": statistics.median(totals),
            "totals_s": totals,
            "rounds": args.rounds,
            "volume_ml": volume_ml,
            "peak_rss_mb": peak_rss_mb(),
            "rss_after_load_mb": rss_after_load,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
