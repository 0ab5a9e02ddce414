"""The two container images: multi-stage, pinned bases, non-root, the right extras, a tight context."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.deploy import checks
from tests.deploy.dockerfiles import (
    IgnorePattern,
    Stage,
    copy_sources,
    instructions,
    is_ignored,
    parse_dockerignore,
    stages,
)

ROOT = checks.REPO_ROOT
DOCKERFILES = {"worker": ROOT / "Dockerfile.worker", "scheduler": ROOT / "Dockerfile.scheduler"}
# The README (pyproject's `readme`, needed to build the package) is the lead's, still being
# written; every other COPY source must exist now.
CONTRACT_FILES = {"README.md"}


def image_stages(role: str) -> list[Stage]:
    return stages(DOCKERFILES[role].read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def ignore_patterns() -> list[IgnorePattern]:
    return parse_dockerignore((ROOT / ".dockerignore").read_text(encoding="utf-8"))


@pytest.mark.parametrize("role", sorted(DOCKERFILES))
def test_image_is_multi_stage_with_pinned_bases(role: str) -> None:
    built = image_stages(role)
    assert len(built) >= 2, "build tools stay in a build stage"
    for stage in built:
        assert checks.image_pin_problems(stage.base, where=role) == []
        assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", stage.base), stage.base


@pytest.mark.parametrize("role", sorted(DOCKERFILES))
def test_image_runs_as_a_numeric_non_root_user(role: str) -> None:
    final = image_stages(role)[-1]
    users = final.all("USER")
    assert users, "the final stage sets USER"
    uid = users[-1].arguments.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric, so Kubernetes' runAsNonRoot can verify it"
    assert any(uid in i.arguments for i in final.all("RUN")), "the user is created with that uid"


@pytest.mark.parametrize("role", sorted(DOCKERFILES))
def test_runtime_stage_copies_only_the_virtualenv_from_the_build(role: str) -> None:
    build, final = image_stages(role)[0], image_stages(role)[-1]
    assert build.name is not None
    froms = [copy_sources(i) for i in final.all("COPY") if copy_sources(i)[2] is not None]
    assert froms == [(["/opt/venv"], "/opt/venv", build.name)]


def pip_installs(stage: Stage) -> list[str]:
    return [i.arguments for i in stage.all("RUN") if "pip install" in i.arguments]


def test_worker_image_installs_the_gpu_and_pacs_extras_by_default() -> None:
    build = image_stages("worker")[0]
    defaults = dict(i.arguments.partition("=")[::2] for i in build.all("ARG"))
    assert defaults.get("ICHVOL_EXTRAS") == "gpu,pacs"  # TensorFlow with CUDA; PACS delivery clients
    (install,) = pip_installs(build)
    assert '".[${ICHVOL_EXTRAS}]"' in install
    assert {"gpu", "pacs"} <= set(checks.pyproject()["project"]["optional-dependencies"])


def test_worker_image_checks_the_default_weights_are_installed() -> None:
    (install,) = pip_installs(image_stages("worker")[0])
    assert "python -I -c" in install and "default_model_path" in install


def test_scheduler_image_has_no_tensorflow() -> None:
    build = image_stages("scheduler")[0]
    (install,) = pip_installs(build)
    extras = re.search(r"\.\[([^\]]*)\]", install)
    assert extras is not None
    chosen = set(extras.group(1).split(","))
    assert chosen == {"monitor", "pacs"}, "Flower and the PACS clients only: no `cpu`/`gpu` extra"
    optional = checks.pyproject()["project"]["optional-dependencies"]
    assert not any("tensorflow" in dep or "keras" in dep for extra in chosen for dep in optional[extra])
    assert not any("tensorflow" in dep for dep in checks.pyproject()["project"]["dependencies"])
    assert "find_spec('tensorflow') is None" in install


def test_scheduler_image_carries_the_migrations_where_alembic_looks() -> None:
    final = image_stages("scheduler")[-1]
    workdir = final.all("WORKDIR")[-1].arguments
    copied = {tuple(copy_sources(i)[0]): copy_sources(i)[1] for i in final.all("COPY") if copy_sources(i)[2] is None}
    assert copied == {("alembic.ini",): "./", ("migrations",): "./migrations"}
    assert workdir == "/app"


def test_default_commands_follow_the_contract() -> None:
    worker_cmd = image_stages("worker")[-1].all("CMD")[-1].arguments
    for part in checks.WORKER_ARGV:
        assert part.format(queue='\\"${ICHVOL_QUEUE:-ichvol}\\"') in worker_cmd
    assert "exec celery" in worker_cmd, "Celery must be PID 1 to get SIGTERM and shut down warm"
    assert image_stages("scheduler")[-1].all("CMD")[-1].arguments == '["ichvol", "scheduler"]'


@pytest.mark.parametrize("role", sorted(DOCKERFILES))
def test_copied_sources_exist_and_are_in_the_build_context(role: str, ignore_patterns: list[IgnorePattern]) -> None:
    for stage in image_stages(role):
        for item in stage.all("COPY") + stage.all("ADD"):
            sources, _, from_stage = copy_sources(item)
            if from_stage is not None:
                continue
            for source in sources:
                assert not is_ignored(source, ignore_patterns), f"{source} is excluded by .dockerignore"
                if source in CONTRACT_FILES:
                    continue
                assert (ROOT / source).exists(), f"{role}: COPY {source} does not exist"


def test_readme_named_by_pyproject_is_the_one_copied() -> None:
    assert checks.pyproject()["project"]["readme"] in CONTRACT_FILES
    for role in DOCKERFILES:
        build = image_stages(role)[0]
        assert any("README.md" in copy_sources(i)[0] for i in build.all("COPY"))


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/config",
        "tests/conftest.py",
        "deploy/k8s/secret.template.yaml",
        "deploy/k8s/my-secrets.yaml",
        ".env",
        "docs/deployment.md",
        "worker/__pycache__/settings.cpython-311.pyc",
        "scheduler/__pycache__/x.pyc",
        "runs/out.nii.gz",
    ],
)
def test_dockerignore_keeps_out(path: str, ignore_patterns: list[IgnorePattern]) -> None:
    assert is_ignored(path, ignore_patterns)


@pytest.mark.parametrize(
    "path",
    [
        "pyproject.toml",
        "worker/core/settings.py",
        "worker/weights/drunet_default.keras",
        "scheduler/__init__.py",
        "migrations/env.py",
        "alembic.ini",
        "README.md",
    ],
)
def test_dockerignore_lets_in(path: str, ignore_patterns: list[IgnorePattern]) -> None:
    assert not is_ignored(path, ignore_patterns)


def test_dockerignore_matching_rules() -> None:
    patterns = parse_dockerignore("*.md\n!README.md\n**/tmp\ndocs/*\n")
    assert is_ignored("CHANGES.md", patterns)
    assert not is_ignored("README.md", patterns)
    assert is_ignored("a/b/tmp/file", patterns)
    assert is_ignored("docs/x.md", patterns)
    assert not is_ignored("sub/CHANGES.md", patterns), "`*` does not cross `/`"


def test_instruction_parsing_joins_continuations_and_drops_comments() -> None:
    parsed = instructions("# c\nARG X=1\nFROM img:${X} AS a\nRUN a \\\n  # inner\n  && b\n")
    assert [(i.keyword, i.arguments) for i in parsed] == [
        ("ARG", "X=1"),
        ("FROM", "img:${X} AS a"),
        ("RUN", "a && b"),
    ]
    (stage,) = stages("ARG X=1\nFROM img:${X} AS a\nRUN a\n")
    assert (stage.base, stage.name) == ("img:1", "a")


def test_dockerfiles_exist_where_compose_builds_them() -> None:
    compose = checks.load_yaml(checks.COMPOSE_FILE)
    built = {svc["build"]["dockerfile"] for svc in compose["services"].values() if "build" in svc}
    assert built == {Path(p).name for p in DOCKERFILES.values()}
