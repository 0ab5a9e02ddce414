"""Just enough Dockerfile and .dockerignore parsing to check the images offline.

No Docker engine runs here, so the tests read the files: instructions per build stage
(with ``ARG`` defaults substituted in ``FROM``), and the build context that .dockerignore
lets through, with Docker's matching rules (Go ``filepath.Match`` plus ``**``; the last
matching pattern wins; a pattern that matches a parent folder matches what is inside it).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    arguments: str  # the rest of the logical line, continuation lines joined


@dataclass
class Stage:
    base: str  # the FROM image after ARG substitution
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def instructions(text: str) -> list[Instruction]:
    """Logical instructions: comments dropped, backslash continuations joined."""
    result: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        logical = (pending + line).strip()
        pending = ""
        if logical:
            keyword, _, arguments = logical.partition(" ")
            result.append(Instruction(keyword.upper(), arguments.strip()))
    if pending:
        raise ValueError("Dockerfile ends inside a continued line")
    return result


def stages(text: str) -> list[Stage]:
    """Build stages in order; ``ARG``s declared before the first ``FROM`` are substituted in it."""
    global_args: dict[str, str] = {}
    result: list[Stage] = []
    for item in instructions(text):
        if item.keyword == "ARG" and not result:
            name, _, default = item.arguments.partition("=")
            global_args[name] = default
        elif item.keyword == "FROM":
            words = item.arguments.split()
            words = [w for w in words if not w.startswith("--platform")]
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: global_args.get(m.group(1) or m.group(2), ""), words[0])
            stage_name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            result.append(Stage(base=base, name=stage_name))
        elif result:
            result[-1].instructions.append(item)
    return result


def copy_sources(item: Instruction) -> tuple[list[str], str, str | None]:
    """(sources, destination, --from stage or None) of a COPY/ADD in shell or JSON form."""
    words = shlex.split(item.arguments)
    flags = [w for w in words if w.startswith("--")]
    paths = [w for w in words if not w.startswith("--")]
    if item.arguments.lstrip().startswith("["):
        import json

        paths = json.loads(item.arguments[item.arguments.index("[") :])
    from_stage = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
    return paths[:-1], paths[-1], from_stage


# --- .dockerignore ------------------------------------------------------------------------


@dataclass(frozen=True)
class IgnorePattern:
    regex: re.Pattern[str]
    exclusion: bool  # a `!` pattern: re-includes


def _glob_to_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
            continue
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            continue
        if char == "*":
            out += "[^/]*"
        elif char == "?":
            out += "[^/]"
        elif char == "[":
            end = pattern.index("]", i)
            out += "[" + pattern[i + 1 : end].replace("!", "^", 1) + "]"
            i = end
        else:
            out += re.escape(char)
        i += 1
    return re.compile(out + r"\Z")


def parse_dockerignore(text: str) -> list[IgnorePattern]:
    patterns = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exclusion = line.startswith("!")
        cleaned = line[1:].strip() if exclusion else line
        cleaned = str(Path("/" + cleaned)).lstrip("/") or "."  # filepath.Clean, relative
        patterns.append(IgnorePattern(_glob_to_regex(cleaned), exclusion))
    return patterns


def is_ignored(path: str, patterns: list[IgnorePattern]) -> bool:
    """Whether .dockerignore keeps ``path`` (relative, `/`-separated) out of the build context."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for pattern in patterns:
        if any(pattern.regex.match(c) for c in candidates):
            ignored = not pattern.exclusion
    return ignored
