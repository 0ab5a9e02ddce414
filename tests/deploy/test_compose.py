"""docker-compose.yml: the Compose schema, `docker-compose config`, and consistency with the code."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.deploy import checks

FIXTURES = Path(__file__).parent / "fixtures"
BROKEN_COMPOSE = FIXTURES / "broken-compose.yml"
DOCKER_COMPOSE = shutil.which("docker-compose")
needs_docker_compose = pytest.mark.skipif(
    DOCKER_COMPOSE is None,
    reason="the docker-compose binary is absent (Debian package `docker-compose`; CI installs it)",
)

Compose = dict[str, Any]


@pytest.fixture(scope="module")
def compose() -> Compose:
    data = checks.load_yaml(checks.COMPOSE_FILE)
    assert isinstance(data, dict)
    return data


def test_compose_file_matches_the_compose_schema(compose: Compose) -> None:
    assert checks.compose_schema_problems(compose) == []


def test_broken_compose_file_is_rejected_by_the_schema() -> None:
    problems = checks.compose_schema_problems(checks.load_yaml(BROKEN_COMPOSE))
    assert len(problems) == 1
    assert "services/redis/healthcheck" in problems[0]
    assert "intervall" in problems[0]


def test_schema_rejects_a_wrong_depends_on_condition(compose: Compose) -> None:
    broken = copy.deepcopy(compose)
    broken["services"]["worker"]["depends_on"]["redis"]["condition"] = "service_ready"
    assert any("depends_on" in p for p in checks.compose_schema_problems(broken))


def run_config(path: Path) -> subprocess.CompletedProcess[str]:
    assert DOCKER_COMPOSE is not None
    return subprocess.run(
        [DOCKER_COMPOSE, "-f", str(path), "--project-directory", str(checks.REPO_ROOT), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        # no host variables: the file's own defaults are checked, plus the required credentials
        env={"PATH": "/usr/bin:/bin", **checks.COMPOSE_ENV},
    )


@needs_docker_compose
def test_docker_compose_config_accepts_the_file() -> None:
    result = run_config(checks.COMPOSE_FILE)
    assert result.returncode == 0, result.stderr


@needs_docker_compose
def test_docker_compose_config_rejects_the_broken_file() -> None:
    result = run_config(BROKEN_COMPOSE)
    assert result.returncode != 0
    assert "intervall" in result.stderr


def test_compose_file_is_consistent_with_settings_and_commands(compose: Compose) -> None:
    assert checks.compose_problems(compose) == []


def services_env(compose: Compose) -> dict[str, Any]:
    env = compose["x-ichvol-env"]
    assert isinstance(env, dict)
    return env


def rename_queue_variable(c: Compose) -> None:
    c["services"]["worker"]["environment"]["ICHVOL_QUEUE_NAME"] = "ichvol"


def worker_queue_differs(c: Compose) -> None:
    c["services"]["worker"]["command"][5] = "--queues=celery"


def short_grace_period(c: Compose) -> None:
    c["services"]["worker"]["stop_grace_period"] = "700s"


def raise_hard_limit(c: Compose) -> None:
    # Merge keys were expanded by the YAML loader: each service has its own copy.
    c["services"]["worker"]["environment"]["ICHVOL_HARD_TIME_LIMIT_S"] = "900"


def no_gpu(c: Compose) -> None:
    del c["services"]["worker"]["deploy"]


def no_scheduler_health(c: Compose) -> None:
    del c["services"]["scheduler"]["healthcheck"]


def start_order_only(c: Compose) -> None:
    c["services"]["scheduler"]["depends_on"] = ["redis", "migrate"]


def worker_waits_for_migration_to_start_only(c: Compose) -> None:
    c["services"]["worker"]["depends_on"]["migrate"]["condition"] = "service_started"


def wrong_database_password(c: Compose) -> None:
    c["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"] = "another"


def malformed_value(c: Compose) -> None:
    c["services"]["scheduler"]["environment"]["ICHVOL_POLL_INTERVAL_S"] = "one minute"


def scheduler_lacks_bucket(c: Compose) -> None:
    del c["services"]["scheduler"]["environment"]["ICHVOL_RESULTS_BUCKET"]


def unpinned_image(c: Compose) -> None:
    c["services"]["redis"]["image"] = "redis:latest"


def flower_port_moved(c: Compose) -> None:
    c["services"]["flower"]["ports"] = ["127.0.0.1:8080:8080"]


def bucket_not_created(c: Compose) -> None:
    c["services"]["createbuckets"]["command"] = ["mc mb --ignore-existing ichvol/pacs-export"]


def stale_image_tag(c: Compose) -> None:
    c["services"]["scheduler"]["image"] = "ichvol-scheduler:0.0.9"


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (rename_queue_variable, "ICHVOL_QUEUE_NAME is not a variable"),
        (worker_queue_differs, "--queues=celery"),
        (short_grace_period, "stop_grace_period"),
        (raise_hard_limit, "hard time limit 900.0"),
        (no_gpu, "reserves no GPU"),
        (no_scheduler_health, "scheduler has no health check"),
        (start_order_only, "depends_on without conditions"),
        (
            worker_waits_for_migration_to_start_only,
            "wait for migrate with condition service_completed_successfully",
        ),
        (wrong_database_password, "ICHVOL_DATABASE_URL"),
        (malformed_value, "ICHVOL_POLL_INTERVAL_S"),
        (scheduler_lacks_bucket, "does not set ICHVOL_RESULTS_BUCKET"),
        (unpinned_image, "not pinned"),
        (flower_port_moved, "publish port 5555"),
        (bucket_not_created, "ICHVOL_RESULTS_BUCKET"),
        (stale_image_tag, "package version"),
    ],
)
def test_consistency_check_catches(compose: Compose, mutate: Callable[[Compose], None], expected: str) -> None:
    broken = copy.deepcopy(compose)
    mutate(broken)
    problems = checks.compose_problems(broken)
    assert any(expected in p for p in problems), problems


def test_a_setting_renamed_in_the_code_breaks_the_check(compose: Compose, monkeypatch: pytest.MonkeyPatch) -> None:
    renamed = {k: v for k, v in checks.settings_variables().items() if k != "ICHVOL_BROKER_URL"}
    monkeypatch.setattr(checks, "settings_variables", lambda: renamed)
    assert any("ICHVOL_BROKER_URL is not a variable" in p for p in checks.compose_problems(compose))


def test_no_credential_value_is_committed(compose: Compose) -> None:
    """Passwords come from the operator's environment / .env: required, never defaulted."""
    text = checks.COMPOSE_FILE.read_text()
    for var in checks.COMPOSE_CREDENTIALS:
        uses = re.findall(r"\$\{" + var + r"(:?[-?][^}]*)?\}", text)
        assert uses, f"{var} is not used"
        assert all(op.startswith(":?") for op in uses), f"{var} must be required (${{{var}:?...}}), not defaulted"
    env = checks.compose_environment({"environment": services_env(compose)})
    assert env["AWS_SECRET_ACCESS_KEY"] == checks.COMPOSE_ENV["MINIO_ROOT_PASSWORD"]
    assert checks.COMPOSE_ENV["POSTGRES_PASSWORD"] in env["ICHVOL_DATABASE_URL"]


@needs_docker_compose
def test_docker_compose_refuses_to_start_without_the_passwords() -> None:
    assert DOCKER_COMPOSE is not None
    result = subprocess.run(
        [DOCKER_COMPOSE, "-f", str(checks.COMPOSE_FILE), "--project-directory", str(checks.REPO_ROOT), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode != 0 and "POSTGRES_PASSWORD" in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("text", "environ", "expected"),
    [
        ("$$HOSTNAME", {}, "$HOSTNAME"),
        ("${A:-x}", {}, "x"),
        ("${A:-x}", {"A": ""}, "x"),
        ("${A-x}", {"A": ""}, ""),
        ("${A:-x}", {"A": "y"}, "y"),
        ("a${A}b$A", {"A": "1"}, "a1b1"),
        ("${A}", {}, ""),
    ],
)
def test_interpolation(text: str, environ: dict[str, str], expected: str) -> None:
    assert checks.interpolate(text, environ) == expected


def test_interpolation_of_a_required_variable_fails() -> None:
    with pytest.raises(ValueError, match="A is not set"):
        checks.interpolate("${A:?set A}", {})


@pytest.mark.parametrize(("text", "seconds"), [("780s", 780), ("13m", 780), ("1h2m3s", 3723), ("1m30s", 90)])
def test_duration_parsing(text: str, seconds: float) -> None:
    assert checks._parse_duration_s(text) == seconds


def test_malformed_duration_is_refused() -> None:
    with pytest.raises(ValueError, match="not a duration"):
        checks._parse_duration_s("13 minutes")
