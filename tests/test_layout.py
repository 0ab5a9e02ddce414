"""The architecture rules the layout promises, checked on the source itself."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORK_MODULES = {"tensorflow", "keras", "tf_keras"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_framework_module_imports_tensorflow_or_keras() -> None:
    offenders = [
        str(path.relative_to(ROOT))
        for package in ("worker", "scheduler")
        for path in sorted((ROOT / package).rglob("*.py"))
        if _imports(path) & FRAMEWORK_MODULES and path != ROOT / "worker" / "model" / "framework.py"
    ]
    assert offenders == []


def test_the_scheduler_and_the_cli_start_without_tensorflow() -> None:
    code = (
        "import sys; import scheduler.main, worker.infra.intake, scheduler.enqueue, worker.cli, worker.celery, "
        "worker.tasks.process, worker.overnight.processing, worker.trends.views; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'tensorflow', 'keras'} "
        "or m == 'worker.model.networks'); "
        "print(bad)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_nothing_but_the_settings_module_reads_the_environment() -> None:
    offenders = []
    for package in ("worker", "scheduler"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name == "settings.py":
                continue
            text = path.read_text()
            if "os.environ" in text or "os.getenv" in text or "getenv(" in text:
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
