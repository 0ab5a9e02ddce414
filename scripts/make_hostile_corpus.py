#!/usr/bin/env python
"""Write the corpus of hostile and broken studies into a folder or straight into a bucket.

    python scripts/make_hostile_corpus.py OUT_DIR                  # one folder per kind
    python scripts/make_hostile_corpus.py --bucket s3://pacs-export --prefix hostile/
    python scripts/make_hostile_corpus.py --list                   # the kinds and their codes

Each kind is one study (tests/helpers/hostile.py builds it from code; nothing binary is
committed). A folder cannot hold kinds whose object keys are not plain relative paths
(``..``, absolute paths, control characters, 1,000-character names): they are skipped
with a note. A bucket receives every kind; an S3 server that refuses or rewrites a key
(SeaweedFS and MinIO refuse ``..``, AWS stores it) is reported, and the rest goes on.
The bucket's endpoint and credentials come from the usual ICHVOL_S3_ENDPOINT_URL,
AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY variables. Each study gets the
``ICHVOL_MARKER_NAME`` marker so that the scheduler registers it at once.

The expected codes assume ICHVOL_MAX_FILES=5000 and ICHVOL_MAX_SLICES=500 (printed with
--list). Research use only, not for clinical use.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # tests.helpers lives in the source checkout, not the package

from tests.helpers.hostile import HOSTILE_KINDS, SUITE_LIMITS, write_to_bucket, write_to_folder  # noqa: E402


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", type=Path, help="new folder to write one sub-folder per kind into")
    parser.add_argument("--bucket", help="s3://bucket to upload into instead of a folder")
    parser.add_argument("--prefix", default="hostile/", help="key prefix in the bucket (default hostile/)")
    parser.add_argument("--only", action="append", metavar="KIND", help="only these kinds (repeatable)")
    parser.add_argument("--list", action="store_true", help="print the kinds and their expected outcome, then exit")
    args = parser.parse_args(argv)
    if not args.list and (args.out_dir is None) == (args.bucket is None):
        parser.error("give OUT_DIR or --bucket (one of them)")
    unknown = sorted(set(args.only or ()) - set(HOSTILE_KINDS))
    if unknown:
        parser.error(f"unknown kinds: {', '.join(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    kinds = [HOSTILE_KINDS[name] for name in (args.only or HOSTILE_KINDS)]
    if args.list:
        limits = ", ".join(f"ICHVOL_{k.upper()}={v}" for k, v in SUITE_LIMITS.items())
        print(f"{len(kinds)} kinds; codes assume {limits}")
        for kind in kinds:
            outcome = "succeeds" if kind.code is None else kind.code.value
            where = "" if kind.local else "  [bucket only]"
            print(f"{kind.name:34s} {outcome:26s} {kind.description}{where}")
        return 0
    if args.bucket:
        return _to_bucket(kinds, args.bucket, args.prefix)
    return _to_folder(kinds, args.out_dir)


def _to_folder(kinds: list, out_dir: Path) -> int:  # type: ignore[type-arg]
    if out_dir.exists() and any(out_dir.iterdir()):
        print(f"make_hostile_corpus: {out_dir} is not empty", file=sys.stderr)
        return 2
    written = skipped = 0
    for kind in kinds:
        if not kind.local:
            print(f"skipped {kind.name}: its object keys cannot be written to a folder (use --bucket)")
            skipped += 1
            continue
        n = write_to_folder(kind, out_dir / kind.name)
        print(f"wrote {kind.name}: {n} files")
        written += 1
    print(f"make_hostile_corpus: {written} studies in {out_dir}, {skipped} bucket-only kinds skipped")
    return 0


def _to_bucket(kinds: list, bucket_uri: str, prefix: str) -> int:  # type: ignore[type-arg]
    from worker.core.settings import Settings
    from worker.infra.storage import make_s3_client

    if not bucket_uri.startswith("s3://") or "/" in bucket_uri[5:].strip("/"):
        print("make_hostile_corpus: --bucket must be s3://bucket", file=sys.stderr)
        return 2
    bucket = bucket_uri[5:].strip("/")
    settings = Settings.from_env()
    client = make_s3_client(settings)
    prefix = prefix if prefix.endswith("/") or not prefix else prefix + "/"
    failed = 0
    for kind in kinds:
        try:
            n = write_to_bucket(kind, client, bucket, f"{prefix}{kind.name}/", marker=settings.marker_name)
            print(f"uploaded {kind.name}: {n} objects")
        except Exception as exc:  # the S3 server refused a key: report and go on
            failed += 1
            print(f"refused {kind.name}: {type(exc).__name__}: {str(exc)[:120]}")
    print(
        f"make_hostile_corpus: {len(kinds) - failed} studies in s3://{bucket}/{prefix}, {failed} refused by the server"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
