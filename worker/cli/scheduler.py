"""``ichvol scheduler``: the scheduler process, ``python -m scheduler``, started in this one's place.

The scheduler is its own package (:mod:`scheduler`): it imports only the worker's core,
infra and model metadata, and the worker imports none of it. So this command does not
call it; it replaces this process with ``python -m scheduler`` (same interpreter, same
environment, same options, ``--log-level`` included), as ``git`` runs its subcommands.
The process keeps its PID, so signals from a container runtime reach the scheduler.
"""

from __future__ import annotations

import argparse
import os
import sys

from worker.core.settings import Settings


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--once", action="store_true", help="poll once, print the counts and exit")
    p.add_argument("--interval", type=float, help="seconds between polls (default ICHVOL_POLL_INTERVAL_S)")


def scheduler_argv(args: argparse.Namespace) -> list[str]:
    """The ``python -m scheduler`` command line for these options."""
    argv = [sys.executable, "-m", "scheduler"]
    if getattr(args, "log_level", None):
        argv += ["--log-level", args.log_level]
    if args.once:
        argv.append("--once")
    if args.interval is not None:
        argv += ["--interval", repr(args.interval)]
    return argv


def run(args: argparse.Namespace, settings: Settings) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    argv = scheduler_argv(args)
    os.execv(argv[0], argv)
    return 1  # not reached: execv replaces this process or raises
