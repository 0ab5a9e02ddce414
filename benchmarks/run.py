"""The performance benchmark: one command, one table, each target with its measured value.

    .venv/bin/python -m benchmarks.run              # full run (15 to 30 minutes on 2 cores)
    .venv/bin/python benchmarks/run.py --quick      # smoke run for CI (tiny model and study)
    .venv/bin/python -m benchmarks.run --json out.json --engine folded-bf16   # judge another engine

Measured in one run on this machine, each part in a subprocess of its own:

1. the machine: CPU, cores, bfloat16/AMX units, load average at the start and the end;
   its matrix-product peak (TensorFlow float32 and bfloat16, numpy float32);
2. model throughput per inference path (slices/s, achieved GFLOP/s, share of the
   float32 peak), rounds interleaved: ``keras-predict`` (plain ``model.predict``, the
   baseline), ``keras`` (the compiled reference), ``folded``, ``folded-bf16``, ``onnx``;
   then one study per core (two processes of one thread) against one process of two;
3. the seed's processing path (1440 x 1440, eager calls, OpenCV contours) against ours
   on the same 32 slices;
4. ``ichvol segment`` on a 32-slice 512 x 512 phantom study: cold (a fresh process, as a
   user runs it) and warm (model loaded, as a worker runs it), per stage;
5. the same study through the queue (scheduler, Celery worker, PostgreSQL, S3), the
   overhead per stage, and read-ahead off/on;
6. peak memory of a worker process measuring a 64-slice 512 x 512 study.

The main case is the paper's DR-UNet (dims 32) at 256 x 256 with random weights (speed
does not depend on them); the shipped default model (dims 8, 160 x 160) is measured too,
for throughput and through ``ichvol segment`` warm, since that is what ``ichvol segment``
runs when no model is given. The targets are judged on ``--engine``, by default the one
``auto`` picks for this CPU. This is a benchmark, not a test: the targets print PASS/FAIL
and the exit status is 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import PYTHON, REPO_ROOT, make_bench_model, make_study, run_json

BASELINE = "keras-predict"
ENGINES = ("keras-predict", "keras", "folded", "folded-bf16", "onnx")


def machine() -> dict[str, Any]:
    from worker.model.cpu import cpu_has_bf16

    model = platform.processor() or "unknown"
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    units = sorted(f for f in flags if f.startswith(("amx", "avx512_bf16", "avx512_vnni", "avx512f")))
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "units": units,
        "bf16": cpu_has_bf16(),
        "python": platform.python_version(),
        "load_start": os.getloadavg(),
    }


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("tensorflow-cpu", "tensorflow", "keras", "onnxruntime", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def one_study_per_core(model: Path, work: Path, *, engine: str, slices: int, rounds: int) -> dict[str, Any]:
    """Two processes of one thread at once against one process of two threads (before and after)."""

    def single(tag: str) -> float:
        data = run_json(
            "model_bench",
            [
                "--model",
                str(model),
                "--slices",
                str(slices),
                "--rounds",
                str(rounds),
                "--threads",
                "0",
                "--engines",
                engine,
            ],
            out=work / f"single-{tag}.json",
        )
        return slices / float(data["engines"][engine]["wall_s"])

    before = single("before")
    procs, outs = [], []
    for index in range(2):
        out = work / f"pair-{index}.json"
        outs.append(out)
        args = ["--model", str(model), "--slices", str(slices), "--rounds", str(rounds), "--threads", "1"]
        procs.append(
            subprocess.Popen(
                [PYTHON, "-m", "benchmarks.model_bench", *args, "--engines", engine, "--json", str(out)],
                cwd=REPO_ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    for proc in procs:
        if proc.wait(timeout=3600) != 0:
            raise RuntimeError("a one-thread model_bench process failed")
    pair = sum(slices / float(json.loads(o.read_text())["engines"][engine]["wall_s"]) for o in outs)
    after = single("after")
    return {"engine": engine, "one_process_two_threads": (before + after) / 2, "two_processes_one_thread": pair}


def cold_segments(study: Path, model: Path, work: Path, *, engines: list[str], rounds: int) -> dict[str, Any]:
    """``ichvol segment`` in fresh processes, engines alternating; medians per stage."""
    from benchmarks.segment_bench import cli_segment

    samples: dict[str, list[dict[str, Any]]] = {e: [] for e in engines}
    for index in range(rounds):
        for engine in engines:
            samples[engine].append(
                cli_segment(study=study, model=model, engine=engine, threads=0, out_dir=work / f"cli-{engine}-{index}")
            )
    out = {}
    for engine, runs in samples.items():
        stages = {k: statistics.median(float(r["timings_s"].get(k, 0.0)) for r in runs) for k in runs[0]["timings_s"]}
        out[engine] = {"stages_s": stages, "process_wall_s": statistics.median(r["process_wall_s"] for r in runs)}
    return out


def collect(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    quick = args.quick
    size, dims, slices = (64, 4, 8) if quick else (256, 32, 32)
    study_side, study_slices, big_slices = (64, 6, 8) if quick else (512, 32, 64)
    rounds = 2 if quick else args.rounds
    engine = resolve_engine(args.engine)
    report: dict[str, Any] = {"quick": quick, "machine": machine(), "versions": _versions(), "engine": engine}

    def step(name: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {name} (load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)

    step("models and studies")
    main_model = make_bench_model(work / f"drunet-d{dims}-{size}.keras", dims=dims, input_size=size)
    study = make_study(work / f"study-{study_slices}x{study_side}", size=study_side, n_slices=study_slices)
    big_study = make_study(work / f"study-{big_slices}x{study_side}", size=study_side, n_slices=big_slices)

    step("model throughput, matrix-product peak, seed path")
    report["model"] = run_json(
        "model_bench",
        [
            "--model",
            str(main_model),
            "--slices",
            str(slices),
            "--rounds",
            str(rounds),
            "--threads",
            "0",
            "--engines",
            ",".join(ENGINES),
            "--peak",
            "--peak-n",
            "256" if quick else "2048",
            "--seed-study",
            str(study),
            "--ours-engine",
            engine,
        ],
        out=work / "model.json",
    )
    if not quick:
        step("shipped model throughput")
        report["shipped_model"] = run_json(
            "model_bench",
            ["--model", str(_shipped()), "--slices", str(slices), "--rounds", str(rounds), "--threads", "0"],
            out=work / "shipped.json",
        )
        step("one study per core")
        report["per_core"] = one_study_per_core(main_model, work, engine=engine, slices=slices, rounds=rounds)

    step("ichvol segment, cold")
    cold_engines = [engine] if quick else ["keras", engine]
    report["segment_cold"] = cold_segments(study, main_model, work, engines=cold_engines, rounds=1 if quick else 2)
    step("segment, warm, and worker memory")
    report["segment_warm"] = {}
    report["memory"] = {}
    for name in [engine] if quick else ["keras", engine, "onnx"]:
        report["segment_warm"][name] = run_json(
            "segment_bench",
            ["--model", str(main_model), "--engine", name, "--study", str(study), "--rounds", str(rounds + 1)],
            out=work / f"warm-{name}.json",
        )
        report["memory"][name] = run_json(
            "segment_bench",
            ["--model", str(main_model), "--engine", name, "--study", str(big_study), "--rounds", "1"],
            out=work / f"memory-{name}.json",
        )
    step("segment, warm, the shipped model")
    report["segment_warm_shipped"] = run_json(
        "segment_bench",
        ["--model", str(_shipped()), "--engine", engine, "--study", str(study), "--rounds", str(rounds + 1)],
        out=work / "warm-shipped.json",
    )
    report["studies"] = {"segment": [study_slices, study_side], "memory": [big_slices, study_side]}
    if not quick and not args.skip_queue:
        step("queue path")
        report["queue"] = run_json(
            "queue_bench",
            ["--model", str(main_model), "--engine", engine, "--study", str(study), "--rounds", "3", "--studies", "4"],
            out=work / "queue.json",
        )
    if not quick and not args.skip_teacher:
        ge = REPO_ROOT.parent / "shared" / "data" / "real-head-ct-ge"
        teacher_study_dir = ge if ge.is_dir() else study
        step(f"BLAST-CT teacher, one model, on {teacher_study_dir.name}")
        report["teacher"] = run_json("teacher_bench", ["--study", str(teacher_study_dir)], out=work / "teacher.json")
    report["machine"]["load_end"] = os.getloadavg()
    return report


def resolve_engine(engine: str) -> str:
    """The concrete engine name (``auto``: the one this CPU gets)."""
    from worker.model.engines import resolve_engine as resolve

    return resolve(engine)


def _shipped() -> Path:
    from worker.model.weights import default_model_path

    return default_model_path()


# --- the table --------------------------------------------------------------------------------


def _row(cells: list[str], widths: list[int]) -> str:
    return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = [_row(headers, widths), "| " + " | ".join("-" * w for w in widths) + " |"]
    lines += [_row(r, widths) for r in rows]
    return "\n".join(lines)


def render(report: dict[str, Any]) -> tuple[str, list[tuple[str, str, bool]]]:
    """The report as markdown tables, and the targets as (name, measured, passed)."""
    out: list[str] = []
    m = report["machine"]
    out.append(f"machine: {m['cpu']}, {m['cores']} cores, units {' '.join(m['units']) or '-'}")
    out.append(f"load average at start {m['load_start'][0]:.2f}, at end {m['load_end'][0]:.2f}; {report['versions']}")
    model = report["model"]
    flops = float(model["flops_per_slice"])
    peak = model.get("matmul_gflops", {})
    fp32_peak = float(peak.get("tf_float32", 0.0)) or float("nan")
    out.append(
        f"\nmatrix-product peak: TF float32 {peak.get('tf_float32', 0):.0f} GFLOP/s, TF bfloat16 "
        f"{peak.get('tf_bfloat16', 0):.0f} GFLOP/s, numpy float32 {peak.get('numpy_float32', 0):.0f} GFLOP/s"
    )
    engines = model["engines"]
    base = engines[BASELINE]
    rows = []
    for name, t in engines.items():
        rate = model["slices"] / t["wall_s"]
        gflops = rate * flops / 1e9
        rows.append(
            [
                name,
                f"{rate:.2f}",
                f"{gflops:.0f}",
                f"{gflops / fp32_peak * 100:.0f} %",
                f"{t['cpu_s'] / model['slices'] * 1000:.0f}",
                f"{base['wall_s'] / t['wall_s']:.2f}x",
                f"{base['cpu_s'] / t['cpu_s']:.2f}x",
            ]
        )
    out.append(
        f"\nmodel throughput: DR-UNet dims {model['dims']} at {model['input_size']} px, "
        f"{flops / 1e9:.2f} GFLOP/slice, {model['slices']} slices, batch {model['batch_size']}, medians of "
        f"{base['rounds']} interleaved rounds"
    )
    out.append(
        table(
            ["path", "slices/s", "GFLOP/s", "of fp32 peak", "CPU ms/slice", "speed-up (wall)", "speed-up (CPU)"],
            rows,
        )
    )
    if "shipped_model" in report:
        s = report["shipped_model"]
        sb = s["engines"][BASELINE]
        srows = [
            [n, f"{s['slices'] / t['wall_s']:.1f}", f"{sb['wall_s'] / t['wall_s']:.2f}x"]
            for n, t in s["engines"].items()
        ]
        out.append(f"\nshipped model (dims {s['dims']}, {s['input_size']} px): slices/s")
        out.append(table(["path", "slices/s", "speed-up"], srows))
    if "per_core" in report:
        p = report["per_core"]
        ratio = p["two_processes_one_thread"] / p["one_process_two_threads"]
        out.append(
            f"\none study per core ({p['engine']}): 2 processes x 1 thread "
            f"{p['two_processes_one_thread']:.2f} slices/s, 1 process x 2 threads "
            f"{p['one_process_two_threads']:.2f} slices/s ({ratio:.2f}x)"
        )
    seed = model.get("seed_comparison")
    if seed:
        out.append(
            f"\nseed's path vs ours on the same {seed['slices']} slices ({seed['native'][0]} px): seed "
            f"{seed['seed']['wall_s']:.2f} s, ours ({seed['ours_engine']}) {seed['ours']['wall_s']:.2f} s: "
            f"{seed['seed']['wall_s'] / seed['ours']['wall_s']:.1f}x faster"
        )
    stage_rows = []
    for name, data in report["segment_cold"].items():
        st = data["stages_s"]
        stage_rows.append(
            [f"ichvol segment, cold, {name}"]
            + [
                f"{st.get(k, 0.0):.2f}"
                for k in ("load_model", "read", "preprocess", "inference", "postprocess", "write")
            ]
            + [f"{sum(st.get(k, 0.0) for k in STAGES):.2f}", f"{data['process_wall_s']:.1f}"]
        )
    for name, data in report["segment_warm"].items():
        st = data["stages_s"]
        stage_rows.append(
            [f"warm worker, {name}", f"({data['load_s']:.1f})"]
            + [f"{st[k]:.2f}" for k in STAGES]
            + [f"{data['total_s']:.2f}", "-"]
        )
    shipped_warm = report.get("segment_warm_shipped")
    if shipped_warm:
        st = shipped_warm["stages_s"]
        stage_rows.append(
            [f"warm worker, {report['engine']}, shipped model", f"({shipped_warm['load_s']:.1f})"]
            + [f"{st[k]:.2f}" for k in STAGES]
            + [f"{shipped_warm['total_s']:.2f}", "-"]
        )
    (n, side), (n_big, _) = report["studies"]["segment"], report["studies"]["memory"]
    out.append(
        f"\none {n}-slice {side} x {side} study, seconds per stage (medians; total = the five stages, no loading)"
    )
    out.append(
        table(
            ["run", "load model", "read", "preprocess", "inference", "postprocess", "write", "total", "process"],
            stage_rows,
        )
    )
    queue = report.get("queue")
    if queue:
        q = queue["in_process"]["stages_s"]
        qrows = [[k, f"{v:.3f}"] for k, v in q.items()]
        out.append("\nqueue path in process (medians per study): claim, download, segment, upload, finish")
        out.append(table(["step", "seconds"], qrows))
        ra = queue["in_process"]["read_ahead_s_per_study"]
        out.append(
            f"read-ahead ({queue['in_process']['studies']} studies back to back): off {ra['off']:.2f} s/study, "
            f"on {ra['on']:.2f} s/study"
        )
        base_segment = None
        for mode in ("off", "on"):
            c = queue.get(f"celery_read_ahead_{mode}")
            if not c:
                continue
            base_segment = base_segment or c["segment_s_median"]
            out.append(
                f"real Celery worker, read-ahead {mode}, {c['studies']} studies: task {c['task_s_median']:.2f} s "
                f"(segment {c['segment_s_median']:.2f} s) + gap between tasks "
                f"{c['gap_between_tasks_s_median'] or 0:.2f} s per study in steady state; first result "
                f"{c['first_study_latency_s']:.1f} s after enqueueing; pool process peak memory "
                f"{c['pool_peak_rss_mb'] or 0:.0f} MB"
            )
    mrows = [[n, f"{d['peak_rss_mb']:.0f}", f"{d['rss_after_load_mb']:.0f}"] for n, d in report["memory"].items()]
    out.append(f"\nworker process peak memory, one {n_big}-slice {side} x {side} study (MB)")
    out.append(table(["engine", "peak RSS", "after loading"], mrows))

    # targets
    engine = report["engine"]
    targets: list[tuple[str, str, bool]] = []
    speedup = base["wall_s"] / engines[engine]["wall_s"] if engine in engines else 0.0
    targets.append(
        (f"model throughput {engine} >= 2.5x plain model.predict (one process)", f"{speedup:.2f}x", speedup >= 2.5)
    )
    if "per_core" in report:
        p = report["per_core"]
        per_core = p["two_processes_one_thread"] / (model["slices"] / base["wall_s"])
        targets.append(
            (
                f"model throughput {engine}, one study per core, >= 2.5x model.predict",
                f"{per_core:.2f}x",
                per_core >= 2.5,
            )
        )
    warm = report["segment_warm"][engine]
    total = float(warm["total_s"])
    non_inference = 1.0 - float(warm["stages_s"]["inference"]) / total
    targets.append((f"{n}-slice study through the pipeline < 2 s (warm)", f"{total:.2f} s", total < 2.0))
    targets.append(("everything but inference < 15 % of it", f"{non_inference * 100:.0f} %", non_inference < 0.15))
    if shipped_warm:
        total_shipped = float(shipped_warm["total_s"])
        non_inference_shipped = 1.0 - float(shipped_warm["stages_s"]["inference"]) / total_shipped
        targets.append(
            (f"{n}-slice study < 2 s (warm), shipped default model", f"{total_shipped:.2f} s", total_shipped < 2.0)
        )
        targets.append(
            (
                "everything but inference < 15 % of it, shipped model",
                f"{non_inference_shipped * 100:.0f} %",
                non_inference_shipped < 0.15,
            )
        )
    if queue and queue.get("celery_read_ahead_off"):
        off = queue["celery_read_ahead_off"]
        # steady state: seconds per study in the queue over the segment stages of the same study
        # (the read-ahead-off run's, which include reading); each run against itself
        for mode in ("off", "on"):
            c = queue.get(f"celery_read_ahead_{mode}")
            if not c:
                continue
            per_study = c["task_s_median"] + (c["gap_between_tasks_s_median"] or 0.0)
            overhead = per_study / off["segment_s_median"] - 1.0
            targets.append(
                (
                    f"queue path adds < 10 % to the study (read-ahead {mode})",
                    f"{overhead * 100:+.0f} %",
                    overhead < 0.10,
                )
            )
    peak_mb = float(report["memory"][engine]["peak_rss_mb"])
    targets.append(
        (f"worker peak memory, {n_big}-slice {side} x {side} study, < 3 GB", f"{peak_mb / 1024:.2f} GB", peak_mb < 3072)
    )
    teacher = report.get("teacher")
    if teacher:
        t = teacher["timings_s"]
        models = ", ".join(teacher["models"])
        out.append(
            f"\nBLAST-CT teacher ({models}, {teacher['engine']}) on {Path(teacher['study']).name} "
            f"({teacher['n_slices']} slices): {teacher['inference_s_per_model']:.1f} s inference per scan per model; "
            f"read {t['read']:.1f} s, load {t['load_model']:.1f} s, write {t['write']:.1f} s; "
            f"hemorrhage marked {teacher['hemorrhage_ml']:.2f} mL; peak memory {teacher['peak_rss_mb']:.0f} MB"
        )
    out.append("\ntargets" + (" (quick run: tiny model and study, figures not meaningful)" if report["quick"] else ""))
    out.append(table(["target", "measured", "result"], [[n, v, "PASS" if ok else "FAIL"] for n, v, ok in targets]))
    return "\n".join(out), targets


STAGES = ("read", "preprocess", "inference", "postprocess", "write")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke run: tiny model, tiny study, no queue")
    parser.add_argument(
        "--engine", default="auto", help="the fast engine the targets are judged on (default: what auto picks here)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per measurement")
    parser.add_argument("--skip-queue", action="store_true", help="skip the queue path (needs PostgreSQL, Redis)")
    parser.add_argument(
        "--skip-teacher", action="store_true", help="skip the BLAST-CT teacher (about a minute to three per model)"
    )
    parser.add_argument("--work", type=Path, help="folder for models and studies (kept; default: a temp folder)")
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ichvol-bench-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        report = collect(args, work)
    text, _ = render(report)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
