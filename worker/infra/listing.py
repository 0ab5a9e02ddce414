"""From a flat bucket listing to studies: grouping, fingerprints, completeness (pure).

A study is everything under one first-level folder below the export prefix:
``<prefix>/<study folder>/<any>/<nesting>``. Objects directly under the prefix belong
to no study and are ignored.

A study is complete when its marker object (``ICHVOL_MARKER_NAME``, at any depth of the
study folder) is present or, without one, when none of its objects changed for the
quiet period. A half-exported study is never processed.

The fingerprint is the SHA-256 of the sorted ``(key, ETag, size)`` lines of the study's
objects, the marker excluded (adding a marker does not make a new version).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from worker.infra.object_store import ObjectInfo


@dataclass(frozen=True)
class StudyListing:
    """One study folder as listed now."""

    prefix: str  # the study folder key, ending with "/"
    objects: tuple[ObjectInfo, ...]  # marker excluded, sorted by key
    has_marker: bool
    last_modified: datetime

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.objects)

    @property
    def n_objects(self) -> int:
        return len(self.objects)

    @property
    def total_bytes(self) -> int:
        return sum(o.size for o in self.objects)

    def is_complete(self, *, now: datetime, quiet_period_s: float) -> bool:
        if not self.objects:
            return False
        if self.has_marker:
            return True
        return now - self.last_modified >= timedelta(seconds=quiet_period_s)


def normalise_prefix(prefix: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/" if prefix else ""


def fingerprint_of(objects: Iterable[ObjectInfo]) -> str:
    digest = hashlib.sha256()
    for obj in sorted(objects, key=lambda o: o.key):
        digest.update(f"{obj.key}\t{obj.etag}\t{obj.size}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _is_marker(key: str, marker_name: str) -> bool:
    return bool(marker_name) and key.rsplit("/", 1)[-1] == marker_name


def study_objects(objects: Iterable[ObjectInfo], *, marker_name: str) -> list[ObjectInfo]:
    """The objects of one study that count for its fingerprint (marker excluded), by key."""
    return sorted((o for o in objects if not _is_marker(o.key, marker_name)), key=lambda o: o.key)


def group_studies(objects: Iterable[ObjectInfo], *, export_prefix: str, marker_name: str) -> dict[str, StudyListing]:
    """Group a (streamed) listing into study folders, keyed by folder prefix. One pass, O(n)."""
    base = normalise_prefix(export_prefix)
    members: dict[str, list[ObjectInfo]] = {}
    markers: set[str] = set()
    for obj in objects:
        if not obj.key.startswith(base):
            continue
        rest = obj.key[len(base) :]
        folder, sep, remainder = rest.partition("/")
        if not sep or not folder or not remainder:
            continue  # an object directly under the prefix belongs to no study
        study_prefix = f"{base}{folder}/"
        if _is_marker(obj.key, marker_name):
            markers.add(study_prefix)
            members.setdefault(study_prefix, [])
            continue
        members.setdefault(study_prefix, []).append(obj)
    studies = {}
    for study_prefix, items in members.items():
        items.sort(key=lambda o: o.key)
        newest = max((o.last_modified for o in items), default=None)
        if newest is None:
            continue
        studies[study_prefix] = StudyListing(
            prefix=study_prefix,
            objects=tuple(items),
            has_marker=study_prefix in markers,
            last_modified=newest,
        )
    return studies
