"""The BLAST-CT teacher on one study: seconds per scan per model, as ``ichvol teacher`` runs it.

``python -m benchmarks.teacher_bench --study S [--models model_1 ...] [--engine auto] --json OUT``
loads the shipped teacher models, runs :func:`worker.measure.teacher_study.teacher_study`
once (read, load, inference over the 1 mm grid in 110^3 patches, write) and reports its
stage timings, the inference seconds per model, the engine that ran, the study's size and
the false or true hemorrhage volume it marked, plus the process's peak memory.
Research use only, not for clinical use.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import peak_rss_mb, write_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, required=True)
    parser.add_argument("--models", nargs="+", default=["model_1"])
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)

    from worker.measure.teacher import load_teacher
    from worker.measure.teacher_study import teacher_study

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ichvol-teacher-bench-") as tmp:
        result = teacher_study(
            study_dir=args.study, out_dir=Path(tmp), teacher=lambda: load_teacher(args.models, engine=args.engine)
        )
    timings = result["timings_s"]
    report: dict[str, Any] = {
        "study": str(args.study),
        "models": list(args.models),
        "engine": result["model"]["engine"],
        "n_slices": result["n_slices"],
        "pixel_spacing_mm": result["pixel_spacing_mm"],
        "timings_s": timings,
        "inference_s_per_model": float(timings["inference"]) / len(args.models),
        "hemorrhage_ml": result["hemorrhage_ml"],
        "wall_s": time.perf_counter() - started,
        "peak_rss_mb": peak_rss_mb(),
    }
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
