"""yamllint over docker-compose.yml and deploy/ with deploy/yamllint.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
from yamllint import linter
from yamllint.config import YamlLintConfig

from tests.deploy import checks

CONFIG = checks.REPO_ROOT / "deploy" / "yamllint.yaml"
FILES = [checks.COMPOSE_FILE, *sorted((checks.REPO_ROOT / "deploy").rglob("*.yaml"))]


def lint(text: str) -> list[str]:
    config = YamlLintConfig(file=str(CONFIG))
    return [f"{p.line}:{p.column} {p.rule}: {p.desc}" for p in linter.run(text, config)]


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(Path(p).relative_to(checks.REPO_ROOT)))
def test_yaml_is_lint_clean(path: Path) -> None:
    assert lint(path.read_text(encoding="utf-8")) == []


def test_lint_catches_a_duplicate_key() -> None:
    """Duplicate keys load silently (the last one wins), so this is the linter's job."""
    problems = lint("a:\n  b: 1\n  b: 2\n")
    assert any("key-duplicates" in p for p in problems), problems
