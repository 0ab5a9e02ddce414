"""The architecture rules the layout promises, checked on the source itself.

``worker/`` is a house of rooms (subpackages); imports go one way, from the entry points
down to ``core``. Every import counts: at the top of a module, inside functions and
under ``TYPE_CHECKING``. docs/architecture.md draws the same arrows.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "worker"
FRAMEWORK_MODULES = {"tensorflow", "keras", "tf_keras"}
CELERY_MODULES = {"celery", "billiard"}

#: The rooms from the bottom up; a room imports only rooms listed before it, and only those in ALLOWED.
ROOMS = (
    "core",
    "imaging",
    "model",
    "outputs",
    "infra",
    "measure",
    "synth",
    "trends",
    "delivery",
    "overnight",
    "tasks",
    "research",
    "cli",
)
#: The arrows: which rooms each room may import (besides itself). ``worker/celery.py`` is part
#: of the tasks room (the Celery adapter: the app, its signals and the tasks).
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "imaging": {"core"},
    "model": {"core"},
    "outputs": {"core"},
    "infra": {"core", "model"},
    "measure": {"core", "imaging", "model", "outputs"},
    "synth": {"core", "imaging", "model"},
    "trends": {"core", "infra"},
    "delivery": {"core", "outputs", "infra"},
    "overnight": {"core", "imaging", "model", "infra", "measure", "delivery"},
    "tasks": {"core", "model", "delivery", "overnight"},
    "research": {"core", "imaging", "model", "outputs", "measure", "synth"},
    "cli": set(ROOMS[:-1]),
}
PRODUCTION_ROOMS = ("measure", "overnight", "delivery", "tasks")
#: What the scheduler may import of the worker: core, infra and the model's metadata.
SCHEDULER_MAY_IMPORT = ("worker.core", "worker.infra", "worker.model.weights")
MAX_MODULE_LINES = 600
MAX_MODULES_PER_FOLDER = 15


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _module_paths() -> dict[str, Path]:
    return {_module_name(p): p for package in ("worker", "scheduler") for p in sorted((ROOT / package).rglob("*.py"))}


def _resolve(name: str) -> str:
    """The project module ``name`` refers to: itself, or the nearest package that holds it."""
    modules = _module_paths()
    while name not in modules and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _imports(path: Path) -> Iterator[tuple[str, int]]:
    """``(imported module, line)`` for every import in the file, nested ones included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, node.lineno
            for alias in node.names:  # `from worker.overnight import runtime` imports a module
                candidate = f"{node.module}.{alias.name}"
                if candidate in _module_paths():
                    yield candidate, node.lineno


@cache
def _project_imports(module: str) -> frozenset[tuple[str, int]]:
    found = set()
    for name, line in _imports(_module_paths()[module]):
        if name.split(".")[0] in ("worker", "scheduler"):
            target = _resolve(name)
            if target != module:
                found.add((target, line))
    return frozenset(found)


def _third_party(module: str) -> set[str]:
    return {name.split(".")[0] for name, _ in _imports(_module_paths()[module])}


def room_of(module: str) -> str | None:
    """The room of a worker module (``worker.celery`` is in ``tasks``); None outside the rooms."""
    parts = module.split(".")
    if parts[0] != "worker" or len(parts) < 2:
        return None
    return "tasks" if parts[1] == "celery" else parts[1]


def _worker_modules() -> list[str]:
    return [m for m in _module_paths() if m.startswith("worker")]


def test_every_worker_module_lives_in_a_room() -> None:
    loose = [m for m in _worker_modules() if m != "worker" and room_of(m) not in ROOMS]
    assert loose == []
    assert {p.name for p in WORKER.iterdir() if p.suffix == ".py"} == {"__init__.py", "celery.py"}


def test_the_arrows_point_down() -> None:
    for room, allowed in ALLOWED.items():
        below = set(ROOMS[: ROOMS.index(room)])
        assert allowed <= below, f"{room} may import {sorted(allowed - below)}, which are not below it"


def test_a_room_imports_only_the_rooms_below_it_that_it_may() -> None:
    offenders = []
    for module in _worker_modules():
        room = room_of(module)
        if room is None:
            continue
        for target, line in sorted(_project_imports(module)):
            other = room_of(target)
            if target.startswith("scheduler"):
                offenders.append(f"{module}:{line} imports {target} (the worker imports the scheduler nowhere)")
            elif other is not None and other != room and other not in ALLOWED[room]:
                offenders.append(f"{module}:{line} ({room}) imports {target} ({other})")
    assert offenders == []


def test_core_imports_nothing_of_the_project() -> None:
    offenders = [
        f"{m}:{line} imports {t}"
        for m in _worker_modules()
        if room_of(m) == "core"
        for t, line in _project_imports(m)
        if room_of(t) != "core"
    ]
    assert offenders == []


def test_production_never_imports_synthetic_data_or_research() -> None:
    offenders = [
        f"{m}:{line} imports {t}"
        for m in _worker_modules()
        if room_of(m) in PRODUCTION_ROOMS
        for t, line in _project_imports(m)
        if room_of(t) in ("synth", "research")
    ]
    assert offenders == []


def test_the_scheduler_imports_only_core_infra_and_model_metadata() -> None:
    offenders = [
        f"{m}:{line} imports {t}"
        for m in _module_paths()
        if m.startswith("scheduler")
        for t, line in _project_imports(m)
        if t.startswith("worker") and not t.startswith(SCHEDULER_MAY_IMPORT)
    ]
    assert offenders == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles_between_modules_or_rooms() -> None:
    modules = {m: {t for t, _ in _project_imports(m)} for m in _module_paths()}
    assert _cycles(modules) == []
    rooms: dict[str, set[str]] = {}
    for module, targets in modules.items():
        room = room_of(module) or module.split(".")[0]
        rooms.setdefault(room, set()).update(other for t in targets if (other := room_of(t) or t.split(".")[0]) != room)
    assert _cycles(rooms) == []


def test_only_the_command_line_parses_arguments() -> None:
    offenders = [m for m in _worker_modules() if room_of(m) != "cli" and "argparse" in _third_party(m)]
    assert offenders == []


def test_only_the_tasks_and_the_app_import_celery() -> None:
    offenders = [m for m in _worker_modules() if room_of(m) != "tasks" and _third_party(m) & CELERY_MODULES]
    assert offenders == []


def test_no_module_over_600_lines_and_no_folder_over_15_modules() -> None:
    long = {m: n for m, p in _module_paths().items() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}
    crowded = {}
    for folder in [WORKER, *(p for p in WORKER.rglob("*") if p.is_dir() and (p / "__init__.py").exists())]:
        modules = [p for p in folder.glob("*.py") if p.name != "__init__.py"]
        if len(modules) > MAX_MODULES_PER_FOLDER:
            crowded[str(folder.relative_to(ROOT))] = len(modules)
    assert crowded == {}


def test_only_the_framework_module_imports_tensorflow_or_keras() -> None:
    offenders = [
        str(path.relative_to(ROOT))
        for module, path in _module_paths().items()
        if _third_party(module) & FRAMEWORK_MODULES and path != ROOT / "worker" / "model" / "framework.py"
    ]
    assert offenders == []


def test_the_scheduler_and_the_cli_start_without_tensorflow() -> None:
    code = (
        "import sys; import scheduler.main, scheduler.enqueue, worker.infra.intake, worker.cli, worker.celery, "
        "worker.tasks.process, worker.overnight.processing, worker.trends.queries; "
        "worker_cli = __import__('worker.cli', fromlist=['build_parser']); worker_cli.build_parser(); "
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


@pytest.mark.parametrize("room", ROOMS)
def test_every_room_says_what_it_holds_and_what_to_read_first(room: str) -> None:
    doc = ast.get_docstring(ast.parse((WORKER / room / "__init__.py").read_text())) or ""
    assert "Read :mod:`worker." in doc, f"worker/{room}/__init__.py names no first module to read"
    first = doc.split("Read :mod:`", 1)[1].split("`", 1)[0]
    assert first in _module_paths(), f"worker/{room}/__init__.py points at {first}, which does not exist"


def test_the_architecture_picture_draws_these_arrows() -> None:
    """docs/architecture.md's matrix: one row per room, a mark in each column it may import."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    rows = {}
    for line in text.splitlines():
        name, bar, cells = line.partition("│ ")
        if bar:
            room = name.split()[0].rstrip("/")
            rows[room] = {
                col
                for col, i in zip(ROOMS[:-1], range(0, 6 * len(ROOMS), 6), strict=False)
                if cells[i : i + 1] in ("●", "w")
            }
    drawn = {room: marks for room, marks in rows.items() if room in ROOMS}
    assert drawn == {room: allowed for room, allowed in ALLOWED.items()}
    assert rows["scheduler"] == {"core", "infra", "model"}
