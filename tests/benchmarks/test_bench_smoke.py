"""CI smoke run of the performance benchmark: ``benchmarks/run.py --quick`` produces its table.

The quick run uses a tiny model and study, so its figures say nothing about speed; what
is checked is that every part runs and reports: each inference path, the stages of
``ichvol segment``, worker memory, and each target with PASS or FAIL.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.mark.timeout(900)
def test_quick_benchmark_prints_the_table(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--quick", "--work", str(tmp_path / "work"), "--json", str(report_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=850,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for engine in ("keras-predict", "keras", "folded", "folded-bf16", "onnx"):
        assert re.search(rf"^\| {re.escape(engine)} +\| [0-9.]+ +\|", out, re.MULTILINE), f"no row for {engine}"
    report = json.loads(report_path.read_text())
    engine = report["engine"]  # what auto picks on this CPU
    assert engine in {"folded", "folded-bf16", "onnx"}
    assert f"ichvol segment, cold, {engine}" in out and f"warm worker, {engine}" in out
    assert f"warm worker, {engine}, shipped model" in out
    assert "seed's path vs ours" in out and "matrix-product peak" in out
    targets = out.split("\ntargets", 1)[1]
    verdicts = re.findall(r"\| (PASS|FAIL) +\|$", targets, re.MULTILINE)
    assert len(verdicts) == 6, targets
    assert "shipped default model" in targets
    engines = report["model"]["engines"]
    assert set(engines) == {"keras-predict", "keras", "folded", "folded-bf16", "onnx"}
    assert all(t["wall_s"] > 0 and t["rounds"] == 2 for t in engines.values())
    assert report["memory"][engine]["peak_rss_mb"] > 100
    stages = report["segment_cold"][engine]["stages_s"]
    assert {"read", "preprocess", "inference", "postprocess", "write", "load_model"} <= set(stages)
    shipped = report["segment_warm_shipped"]
    assert shipped["total_s"] > 0 and shipped["stages_s"]["inference"] > 0
