"""The names deployment files rely on exist in the code: console scripts, subcommands, settings."""

from __future__ import annotations

import argparse
import importlib.util
import re
from functools import cache

import pytest
import yaml

from tests.deploy import checks


@cache
def deployment_texts() -> dict[str, str]:
    """docker-compose.yml and every file under deploy/ (the texts an operator copies)."""
    files = [checks.COMPOSE_FILE, *sorted(p for p in (checks.REPO_ROOT / "deploy").rglob("*") if p.is_file())]
    return {str(p.relative_to(checks.REPO_ROOT)): p.read_text(encoding="utf-8") for p in files}


def variables_named(text: str) -> set[str]:
    return set(re.findall(r"\b(?:ICHVOL_[A-Z0-9_]+|AWS_ACCESS_KEY_ID|AWS_SECRET_ACCESS_KEY)\b", text))


def test_the_ichvol_console_script_exists() -> None:
    assert checks.console_scripts().get("ichvol") == "worker.cli:main"


def test_the_subcommands_the_deployment_runs_exist() -> None:
    if importlib.util.find_spec("worker.cli") is None:
        pytest.skip("worker/cli.py is not written yet (the lead's); `ichvol scheduler`/`ichvol check` unchecked")
    from worker.cli import build_parser  # type: ignore[import-not-found,unused-ignore]

    try:
        parser = build_parser()
    except ModuleNotFoundError as exc:  # a subcommand's module that another engineer is still writing
        pytest.skip(f"worker.cli.build_parser() needs {exc.name!r}, not written yet; subcommands unchecked")
    subcommands: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            subcommands |= {str(name) for name in action.choices or ()}
    assert {checks.SCHEDULER_ARGV[1], checks.CHECK_ARGV[1]} <= subcommands


def test_every_variable_in_compose_and_manifests_is_in_the_settings_table() -> None:
    """The README's settings table is rendered from worker.core.settings: same names everywhere."""
    from worker.core.settings import settings_table_markdown

    table = settings_table_markdown()
    for name, text in deployment_texts().items():
        for variable in sorted(variables_named(text)):
            assert f"`{variable}`" in table, f"{name} names {variable}, which the settings table lacks"


def test_the_readme_names_the_variables_the_deployment_sets() -> None:
    readme = checks.REPO_ROOT / "README.md"
    used = set().union(*(variables_named(t) for t in deployment_texts().values()))
    assert used >= checks.REQUIRED_VARIABLES
    if readme.is_file() and "| variable |" in readme.read_text(encoding="utf-8"):
        text = readme.read_text(encoding="utf-8")
        missing = sorted(v for v in used if f"`{v}`" not in text)
        assert missing == [], f"README.md's settings table lacks {missing}"


def test_secret_variables_are_the_secret_settings() -> None:
    secret = {env for env, row in checks.settings_variables().items() if row["secret"]}
    assert secret == checks.SECRET_VARIABLES


def test_every_yaml_file_under_deploy_parses() -> None:
    for name, text in deployment_texts().items():
        if name.endswith((".yaml", ".yml")):
            assert list(yaml.safe_load_all(text)), f"{name} is empty"


def test_validate_command_reports_and_fails_on_problems(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert checks.main([]) == 0
    assert "deploy: 0 problem(s)" in capsys.readouterr().out
    monkeypatch.setattr(checks, "all_problems", lambda: ["k8s: something is wrong"])
    assert checks.main([]) == 1
    assert "k8s: something is wrong" in capsys.readouterr().out


def test_validate_command_renders_an_overlay(capsys: pytest.CaptureFixture[str]) -> None:
    assert checks.main(["render", "fixed-workers"]) == 0
    documents = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["kind"] for d in documents].count("Deployment") == 3
