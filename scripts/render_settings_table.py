#!/usr/bin/env python3
"""Rewrite the settings table in README.md from worker/core/settings.py (the test requires them equal)."""

from __future__ import annotations

import re
from pathlib import Path

from worker.core.settings import settings_table_markdown

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- settings-table: rendered by worker.core.settings.settings_table_markdown(); a test keeps it current -->"

text = README.read_text()
start = text.index(MARKER) + len(MARKER)
rest = text[start:]
match = re.search(r"\n(?!\|)", rest.lstrip("\n"))
table_end = start + (len(rest) - len(rest.lstrip("\n"))) + (match.start() if match else len(rest.lstrip("\n")))
README.write_text(text[:start] + "\n" + settings_table_markdown() + text[table_end:])
print(f"settings table in {README} updated")
