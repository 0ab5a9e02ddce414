"""The command line's one pattern: every command a module with ``add_arguments`` and ``run``."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

import pytest

from worker import cli


def test_every_command_is_a_module_with_add_arguments_and_run() -> None:
    for name in cli.COMMANDS:
        module = importlib.import_module(cli.command_module(name))
        assert callable(module.add_arguments) and callable(module.run), name
    subcommands = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert list(subcommands.choices) == list(cli.COMMANDS)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["scheduler"], ["-m", "scheduler"]),
        (["scheduler", "--once"], ["-m", "scheduler", "--once"]),
        (
            ["--log-level", "DEBUG", "scheduler", "--interval", "2.5"],
            ["-m", "scheduler", "--log-level", "DEBUG", "--interval", "2.5"],
        ),
    ],
)
def test_ichvol_scheduler_starts_python_m_scheduler_in_its_place(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], expected: list[str]
) -> None:
    started: list[tuple[str, list[str]]] = []

    def execv(path: str, args: list[str]) -> Any:
        started.append((path, args))
        raise SystemExit(0)  # execv does not return

    monkeypatch.setattr("os.execv", execv)
    with pytest.raises(SystemExit):
        cli.main(argv)
    assert started == [(sys.executable, [sys.executable, *expected])]


def test_python_m_scheduler_takes_the_same_options() -> None:
    from scheduler.main import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--log-level", "DEBUG", "--interval", "2.5", "--once"])
    assert (args.log_level, args.interval, args.once) == ("DEBUG", 2.5, True)
