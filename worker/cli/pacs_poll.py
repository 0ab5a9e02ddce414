"""``ichvol pacs-poll``: copy new head CTs from a PACS (QIDO-RS/WADO-RS) into the export bucket.

Runs beside ``ichvol scheduler``, which takes the copied studies from there
(:mod:`worker.delivery.pacs_source`).
"""

from __future__ import annotations

import argparse

from worker.core.settings import Settings


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--once", action="store_true", help="poll once, print the counts and exit")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from worker.delivery.pacs_source import run_pacs_poll

    return run_pacs_poll(settings, once=args.once)
