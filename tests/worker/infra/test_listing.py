"""Grouping a bucket listing into studies, fingerprints and the completeness rule."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from worker.infra.listing import fingerprint_of, group_studies
from worker.infra.object_store import ObjectInfo

T0 = datetime(2026, 11, 27, 22, 0, tzinfo=UTC)


def obj(key: str, etag: str = "e", size: int = 10, age_s: float = 600) -> ObjectInfo:
    return ObjectInfo(key=key, etag=etag, size=size, last_modified=T0 - timedelta(seconds=age_s))


def test_first_level_folders_below_the_prefix_are_studies() -> None:
    objects = [
        obj("exports/A/1.dcm"),
        obj("exports/A/sub/2.dcm"),
        obj("exports/B/x.dcm"),
        obj("exports/loose.dcm"),  # directly under the prefix: no study
        obj("other/C/1.dcm"),  # outside the prefix
    ]
    studies = group_studies(objects, export_prefix="exports", marker_name="_COMPLETE")
    assert sorted(studies) == ["exports/A/", "exports/B/"]
    assert [o.key for o in studies["exports/A/"].objects] == ["exports/A/1.dcm", "exports/A/sub/2.dcm"]


def test_marker_completes_and_is_not_part_of_the_fingerprint() -> None:
    files = [obj("e/A/1.dcm", age_s=1), obj("e/A/2.dcm", age_s=1)]
    without = group_studies(files, export_prefix="e", marker_name="_COMPLETE")["e/A/"]
    with_marker = group_studies([*files, obj("e/A/_COMPLETE", age_s=0)], export_prefix="e", marker_name="_COMPLETE")[
        "e/A/"
    ]
    assert not without.is_complete(now=T0, quiet_period_s=120)
    assert with_marker.is_complete(now=T0, quiet_period_s=120)
    assert with_marker.fingerprint == without.fingerprint


def test_quiet_period_completes_without_marker() -> None:
    fresh = group_studies([obj("e/A/1.dcm", age_s=119)], export_prefix="e", marker_name="_COMPLETE")["e/A/"]
    quiet = group_studies([obj("e/A/1.dcm", age_s=120)], export_prefix="e", marker_name="_COMPLETE")["e/A/"]
    assert not fresh.is_complete(now=T0, quiet_period_s=120)
    assert quiet.is_complete(now=T0, quiet_period_s=120)


def test_a_marker_alone_is_not_a_complete_study() -> None:
    studies = group_studies([obj("e/A/_COMPLETE")], export_prefix="e", marker_name="_COMPLETE")
    assert "e/A/" not in studies or not studies["e/A/"].is_complete(now=T0, quiet_period_s=0)


def test_fingerprint_depends_on_key_etag_size_not_order() -> None:
    a, b = obj("k/1", "x", 1), obj("k/2", "y", 2)
    assert fingerprint_of([a, b]) == fingerprint_of([b, a])
    assert fingerprint_of([a, b]) != fingerprint_of([a, obj("k/2", "z", 2)])
    assert fingerprint_of([a, b]) != fingerprint_of([a, obj("k/2", "y", 3)])
    assert fingerprint_of([a, b]) != fingerprint_of([a, obj("k/3", "y", 2)])


def test_empty_prefix_means_bucket_root() -> None:
    studies = group_studies([obj("A/1.dcm"), obj("top.dcm")], export_prefix="", marker_name="_COMPLETE")
    assert sorted(studies) == ["A/"]
