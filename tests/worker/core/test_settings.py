"""The one settings object: parsing, validation with the variable's name, the README table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from worker.core.errors import ConfigurationError
from worker.core.settings import Settings, settings_fields, settings_table_markdown

README = Path(__file__).resolve().parents[3] / "README.md"


def test_defaults_are_sane() -> None:
    s = Settings.from_env({})
    assert s.broker_url == "redis://127.0.0.1:6379/0"
    assert s.quiet_period_s == 120.0
    assert s.visibility_timeout_s > s.hard_time_limit_s > s.soft_time_limit_s


def test_values_are_parsed_by_type() -> None:
    s = Settings.from_env(
        {"ICHVOL_THRESHOLD": "0.4", "ICHVOL_BATCH_SIZE": "4", "ICHVOL_INTRACRANIAL_ONLY": "false", "ICHVOL_MODEL": ""}
    )
    assert (s.threshold, s.inference_batch_size, s.restrict_to_intracranial, s.model_path) == (0.4, 4, False, None)


@pytest.mark.parametrize(
    ("env", "value"),
    [
        ("ICHVOL_THRESHOLD", "1.5"),
        ("ICHVOL_BATCH_SIZE", "zero"),
        ("ICHVOL_BATCH_SIZE", "0"),
        ("ICHVOL_QUIET_PERIOD_S", "-1"),
        ("ICHVOL_INTRACRANIAL_ONLY", "maybe"),
        ("ICHVOL_HARD_TIME_LIMIT_S", "nan"),
    ],
)
def test_malformed_values_name_the_variable(env: str, value: str) -> None:
    with pytest.raises(ConfigurationError, match=f"^{env}: "):
        Settings.from_env({env: value})


def test_hard_limit_must_exceed_soft_limit() -> None:
    with pytest.raises(ConfigurationError, match="ICHVOL_HARD_TIME_LIMIT_S"):
        Settings.from_env({"ICHVOL_SOFT_TIME_LIMIT_S": "100", "ICHVOL_HARD_TIME_LIMIT_S": "50"})


def test_secrets_are_redacted() -> None:
    s = Settings.from_env({"ICHVOL_DATABASE_URL": "postgresql://u:pw@h/db", "AWS_SECRET_ACCESS_KEY": "k"})
    red = s.redacted()
    assert red["database_url"] == "***" and red["aws_secret_access_key"] == "***"
    assert red["queue_name"] == "ichvol"


def test_overrides_win_over_the_environment() -> None:
    assert Settings.from_env({"ICHVOL_THRESHOLD": "0.4"}, threshold=0.7).threshold == 0.7


def test_every_variable_is_unique_and_documented() -> None:
    names = [row["env"] for row in settings_fields()]
    assert len(names) == len(set(names))
    assert all(row["help"] for row in settings_fields())


def test_readme_settings_table_is_the_rendered_one() -> None:
    text = README.read_text()
    table = settings_table_markdown()
    assert table in text, "README settings table is stale: paste worker.core.settings.settings_table_markdown()"
    documented = set(re.findall(r"^\| `([A-Z0-9_]+)` \|", text, flags=re.M))
    assert documented == {row["env"] for row in settings_fields()}
