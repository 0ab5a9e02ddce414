"""worker.infra.storage: key safety, LocalStore, and S3Store against a real SeaweedFS on loopback."""

from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from tests.helpers.services import S3Bucket, S3Server, free_ports
from worker.core.errors import ConfigurationError, ErrorCode, StudyError, TransientError
from worker.core.settings import Settings
from worker.infra.object_store import (
    TEMP_PREFIX,
    ObjectInfo,
    ObjectNotFoundError,
    ObjectStore,
    StorageError,
    safe_relative_path,
)
from worker.infra.storage import MULTIPART_THRESHOLD_BYTES, LocalStore, S3Store, map_s3_error, open_store

# --------------------------------------------------------------------------------------------
# safe_relative_path


@pytest.mark.parametrize(
    ("key", "prefix", "expected"),
    [
        ("exports/S1/a.dcm", "exports/S1/", "a.dcm"),
        ("exports/S1/series 2/IM0001", "exports/S1", "series 2/IM0001"),  # trailing "/" implied
        ("a.dcm", "", "a.dcm"),
        ("exports/S1/..hidden/x", "exports/S1/", "..hidden/x"),  # ".." only as a whole part is unsafe
        ("exports/S1/" + "n" * 255, "exports/S1/", "n" * 255),
        ("exports/S1/é.dcm", "exports/S1/", "é.dcm"),
    ],
)
def test_safe_relative_path_accepts_plain_keys(key: str, prefix: str, expected: str) -> None:
    assert safe_relative_path(key, prefix) == PurePosixPath(expected)


@pytest.mark.parametrize(
    "key",
    [
        "p/../x",
        "p/a/../../x",
        "p/./x",
        "p/..",
        "p//etc/passwd",
        "p/a//b",
        "p/a/",
        "p/",
        "p/a\x00b",
        "p/a\nb",
        "p/a\x1bb",
        "p/a\x7fb",
        "p/a\x85b",  # C1 control
        "p/a\\..\\b",
        "p/" + "n" * 256,
        "p/" + "é" * 128,  # 256 UTF-8 bytes
        "p/" + "n" * 1000,
        "p/a\udcffb",  # not UTF-8 (surrogate escape of a raw byte)
        "q/a.dcm",  # outside the folder
        "pp/a.dcm",  # shares the prefix string, not the folder
    ],
)
def test_safe_relative_path_refuses_dangerous_keys(key: str) -> None:
    with pytest.raises(StudyError) as info:
        safe_relative_path(key, "p")
    assert info.value.code is ErrorCode.UNSAFE_PATH
    assert "re-export" in info.value.message
    # the message is one printable line, short even for a 1000-character key
    assert info.value.message.isprintable()
    assert len(info.value.message) < 300


def test_safe_relative_path_refuses_absolute_keys_at_bucket_root() -> None:
    with pytest.raises(StudyError) as info:
        safe_relative_path("/etc/passwd", "")
    assert "absolute" in info.value.message


# --------------------------------------------------------------------------------------------
# LocalStore


def _write(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_local_store_round_trip(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "bucket")
    uri = store.put_bytes("results/a b/r.json", b'{"v": 1}', content_type="application/json")
    assert uri == (tmp_path / "bucket" / "results" / "a b" / "r.json").as_uri()
    assert uri.startswith("file:///") and "a%20b" in uri
    assert store.exists("results/a b/r.json")
    assert not store.exists("results/a b/other.json")

    src = _write(tmp_path / "src.bin", b"abc" * 1000)
    assert store.upload_file("results/src.bin", src) == store.uri("results/src.bin")

    dest = tmp_path / "out" / "copy.bin"
    store.download("results/src.bin", dest)
    assert dest.read_bytes() == b"abc" * 1000

    store.delete("results/src.bin")
    store.delete("results/src.bin")  # missing: not an error
    assert not store.exists("results/src.bin")
    with pytest.raises(ObjectNotFoundError):
        store.download("results/src.bin", tmp_path / "out" / "gone.bin")
    assert not (tmp_path / "out" / "gone.bin").exists()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(TEMP_PREFIX)]


def test_local_store_lists_in_s3_key_order_with_prefix(tmp_path: Path) -> None:
    root = tmp_path / "bucket"
    keys = [
        "a-b",
        "a/x",
        "ab",
        "exports/S1/1.dcm",
        "exports/S1/sub/2.dcm",
        "exports/S10/1.dcm",
        "exports/T/1",
    ]
    for key in keys:
        _write(root / key)
    store = LocalStore(root)
    # S3 order is UTF-8 byte order of the whole key: "a-b" < "a/x" < "ab".
    assert [o.key for o in store.iter_objects("")] == sorted(keys)
    assert [o.key for o in store.iter_objects("exports/S1/")] == ["exports/S1/1.dcm", "exports/S1/sub/2.dcm"]
    assert [o.key for o in store.iter_objects("exports/S1")] == [
        "exports/S1/1.dcm",
        "exports/S1/sub/2.dcm",
        "exports/S10/1.dcm",
    ]
    assert list(store.iter_objects("nothing/here/")) == []


def test_local_store_object_info(tmp_path: Path) -> None:
    root = tmp_path / "bucket"
    path = _write(root / "s/a.dcm", b"12345")
    os.utime(path, ns=(1_700_000_000_123_456_789, 1_700_000_000_123_456_789))
    store = LocalStore(root)
    (info,) = store.iter_objects("s/")
    assert info.size == 5
    assert info.last_modified.tzinfo is UTC
    assert abs(info.last_modified.timestamp() - 1_700_000_000.123456789) < 1e-5
    assert next(iter(store.iter_objects("s/"))).etag == info.etag  # stable

    os.utime(path, ns=(1_700_000_001_000_000_000, 1_700_000_001_000_000_000))
    (touched,) = store.iter_objects("s/")
    assert touched.etag != info.etag
    path.write_bytes(b"123456")
    os.utime(path, ns=(1_700_000_001_000_000_000, 1_700_000_001_000_000_000))
    (grown,) = store.iter_objects("s/")
    assert grown.etag not in {info.etag, touched.etag}


def test_local_store_skips_links_and_temp_files(tmp_path: Path) -> None:
    outside = _write(tmp_path / "secret" / "passwd", b"root")
    root = tmp_path / "bucket"
    _write(root / "s/real.dcm")
    _write(root / "s" / f"{TEMP_PREFIX}123")
    (root / "s" / "link.dcm").symlink_to(outside)
    (root / "s" / "linkdir").symlink_to(outside.parent, target_is_directory=True)
    (root / "escape").symlink_to(outside.parent, target_is_directory=True)
    store = LocalStore(root)
    assert [o.key for o in store.iter_objects("")] == ["s/real.dcm"]
    assert list(store.iter_objects("escape/")) == []
    assert not store.exists("s/link.dcm")
    with pytest.raises(ObjectNotFoundError):
        store.download("s/linkdir/passwd", tmp_path / "stolen")
    assert not (tmp_path / "stolen").exists()


def test_local_store_refuses_keys_that_leave_the_root(tmp_path: Path) -> None:
    _write(tmp_path / "secret.txt")
    store = LocalStore(tmp_path / "bucket")
    (tmp_path / "bucket").mkdir()
    for call in (
        lambda: store.put_bytes("../secret.txt", b"overwritten"),
        lambda: store.download("../secret.txt", tmp_path / "x"),
        lambda: store.exists("/etc/passwd"),
        lambda: store.delete("a/../../secret.txt"),
        lambda: list(store.iter_objects("../")),
    ):
        with pytest.raises(StorageError):
            call()
    assert (tmp_path / "secret.txt").read_bytes() == b"x"


def test_local_store_missing_root_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="does not exist"):
        list(LocalStore(tmp_path / "nope").iter_objects(""))


def test_local_download_prefix_writes_inside_dest(tmp_path: Path) -> None:
    root = tmp_path / "bucket"
    for key in ["exports/S1/a.dcm", "exports/S1/sub/b.dcm", "exports/S2/c.dcm"]:
        _write(root / key, key.encode())
    store = LocalStore(root)
    dest = tmp_path / "work"
    paths = store.download_prefix("exports/S1/", dest)
    assert paths == [(dest / "a.dcm").resolve(), (dest / "sub" / "b.dcm").resolve()]
    assert (dest / "sub" / "b.dcm").read_bytes() == b"exports/S1/sub/b.dcm"
    assert sorted(p.relative_to(dest) for p in dest.rglob("*") if p.is_file()) == [
        Path("a.dcm"),
        Path("sub/b.dcm"),
    ]
    only = store.download_prefix("exports/S2", tmp_path / "w2", keys=["exports/S2/c.dcm"])
    assert only == [(tmp_path / "w2" / "c.dcm").resolve()]


def test_local_download_prefix_refuses_control_characters_before_writing(tmp_path: Path) -> None:
    root = tmp_path / "bucket"
    _write(root / "S1" / "a.dcm")
    _write(root / "S1" / "evil\nname.dcm")  # a legal Linux file name, refused as a key
    dest = tmp_path / "work"
    with pytest.raises(StudyError) as info:
        LocalStore(root).download_prefix("S1/", dest)
    assert info.value.code is ErrorCode.UNSAFE_PATH
    assert not dest.exists() or not any(dest.iterdir())  # nothing written, not even a.dcm


@pytest.mark.parametrize(
    "bad_key",
    ["S1/../x", "S1/../../etc/cron.d/x", "/S1/abs", "S1//abs", "S1/a\x00b", "S1/" + "n" * 1000, "S2/x"],
)
def test_download_prefix_refuses_dangerous_keys(tmp_path: Path, bad_key: str) -> None:
    root = tmp_path / "bucket"
    _write(root / "S1" / "a.dcm")
    dest = tmp_path / "work"
    with pytest.raises(StudyError) as info:
        LocalStore(root).download_prefix("S1/", dest, keys=["S1/a.dcm", bad_key])
    assert info.value.code is ErrorCode.UNSAFE_PATH
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [root / "S1" / "a.dcm"]


def test_download_prefix_refuses_file_and_folder_of_one_name(tmp_path: Path) -> None:
    root = tmp_path / "bucket"
    _write(root / "S1" / "a.dcm")
    with pytest.raises(StudyError, match="both a file and a folder"):
        LocalStore(root).download_prefix("S1/", tmp_path / "work", keys=["S1/a", "S1/a/b"])


def test_download_prefix_does_not_follow_links_in_dest(tmp_path: Path) -> None:
    root = tmp_path / "bucket"
    _write(root / "S1" / "sub" / "x.dcm")
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "work"
    dest.mkdir()
    (dest / "sub").symlink_to(outside, target_is_directory=True)
    with pytest.raises(StudyError) as info:
        LocalStore(root).download_prefix("S1/", dest)
    assert info.value.code is ErrorCode.UNSAFE_PATH
    assert list(outside.iterdir()) == []


def test_download_prefix_skips_folder_markers(tmp_path: Path) -> None:
    root = tmp_path / "bucket"
    _write(root / "S1" / "a.dcm")
    paths = LocalStore(root).download_prefix("S1/", tmp_path / "w", keys=["S1/", "S1/sub/", "S1/a.dcm"])
    assert paths == [(tmp_path / "w" / "a.dcm").resolve()]


def test_local_store_satisfies_the_protocol(tmp_path: Path) -> None:
    store: ObjectStore = LocalStore(tmp_path)
    assert isinstance(store.uri("a"), str)


# --------------------------------------------------------------------------------------------
# open_store and error mapping (no network)


def test_open_store_chooses_the_backend(tmp_path: Path) -> None:
    settings = Settings(s3_endpoint_url="http://127.0.0.1:1", aws_access_key_id="k", aws_secret_access_key="s")
    s3 = open_store("s3://pacs-export", settings)
    assert isinstance(s3, S3Store) and s3.bucket == "pacs-export"
    assert s3.uri("a/b.dcm") == "s3://pacs-export/a/b.dcm"
    assert isinstance(open_store("s3://pacs-export/", settings), S3Store)
    bare = open_store("pacs-export", settings)
    assert isinstance(bare, S3Store) and bare.bucket == "pacs-export"

    local = open_store(tmp_path.as_uri(), settings)
    assert isinstance(local, LocalStore) and local.root == tmp_path
    spaced = open_store((tmp_path / "a b").as_uri(), settings)
    assert isinstance(spaced, LocalStore) and spaced.root == tmp_path / "a b"
    plain = open_store(str(tmp_path), settings)
    assert isinstance(plain, LocalStore) and plain.root == tmp_path
    relative = open_store("./exports", settings)
    assert isinstance(relative, LocalStore) and relative.root == Path.cwd() / "exports"

    for bad in ("s3://bucket/key", "s3://", "ftp://host/x", "file://otherhost/x", "  "):
        with pytest.raises(ConfigurationError):
            open_store(bad, settings)


def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op")


@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        ("SlowDown", 503, TransientError),
        ("InternalError", 500, TransientError),
        ("ServiceUnavailable", 503, TransientError),
        ("", 502, TransientError),
        ("RequestTimeout", 400, TransientError),
        ("NoSuchKey", 404, ObjectNotFoundError),
        ("404", 404, ObjectNotFoundError),
        ("NoSuchBucket", 404, StorageError),
        ("AccessDenied", 403, StorageError),
        ("InvalidAccessKeyId", 403, StorageError),
        ("SignatureDoesNotMatch", 403, StorageError),
    ],
)
def test_map_s3_error(code: str, status: int, expected: type[Exception]) -> None:
    mapped = map_s3_error(_client_error(code, status), what="s3://b/k")
    assert type(mapped) is expected
    assert mapped is not None and mapped.transient == (expected is TransientError)


def test_map_s3_error_leaves_other_exceptions_alone() -> None:
    assert map_s3_error(ValueError("x"), what="s3://b/k") is None


@pytest.mark.integration
def test_unreachable_endpoint_is_transient(tmp_path: Path) -> None:
    (port,) = free_ports(1)  # nothing listens there
    # one attempt: the adaptive retries of make_s3_client would only make this test slow
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{port}",
        region_name="us-east-1",
        aws_access_key_id="k",
        aws_secret_access_key="s",
        config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=1),
    )
    store = S3Store(bucket="b", client=client)
    with pytest.raises(TransientError):
        list(store.iter_objects(""))
    with pytest.raises(TransientError):
        store.download("k", tmp_path / "k")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# S3Store against SeaweedFS


def _put_many(bucket: S3Bucket, keys: list[str]) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda k: bucket.client.put_object(Bucket=bucket.name, Key=k, Body=b""), keys))


@pytest.mark.integration
def test_s3_iter_objects_paginates_lazily(s3_bucket: S3Bucket) -> None:
    keys = [f"exports/S1/{i:05d}.dcm" for i in range(1234)]
    _put_many(s3_bucket, [*keys, "exports/S2/x.dcm", "exports/S10/y.dcm", "other.txt"])
    calls: list[str] = []
    s3_bucket.client.meta.events.register("after-call.s3.ListObjectsV2", lambda **kwargs: calls.append("ListObjectsV2"))
    iterator = s3_bucket.store.iter_objects("exports/S1/")
    first = next(iterator)
    assert first.key == keys[0]
    assert len(calls) == 1  # one page fetched so far
    rest = list(iterator)
    assert [first.key] + [o.key for o in rest] == keys
    assert len(calls) == 2  # 1000 + 234
    assert all(o.size == 0 and o.last_modified.tzinfo is UTC for o in rest)
    assert [o.key for o in s3_bucket.store.iter_objects("exports/S1")] == [*keys, "exports/S10/y.dcm"]


@pytest.mark.integration
def test_s3_round_trip_etag_and_uri(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    store = s3_bucket.store
    data = b"hello hematoma"
    uri = store.put_bytes("r/a.json", data, content_type="application/json")
    assert uri == f"s3://{s3_bucket.name}/r/a.json"
    (info,) = store.iter_objects("r/")
    assert info == ObjectInfo(
        key="r/a.json", etag=hashlib.md5(data).hexdigest(), size=len(data), last_modified=info.last_modified
    )
    assert abs((datetime.now(UTC) - info.last_modified).total_seconds()) < 120
    head = s3_bucket.client.head_object(Bucket=s3_bucket.name, Key="r/a.json")
    assert head["ContentType"] == "application/json"
    assert store.exists("r/a.json") and not store.exists("r/b.json")
    store.download("r/a.json", tmp_path / "d" / "a.json")
    assert (tmp_path / "d" / "a.json").read_bytes() == data
    store.delete("r/a.json")
    store.delete("r/a.json")
    assert not store.exists("r/a.json")


@pytest.mark.integration
def test_s3_large_upload_goes_multipart(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    data = os.urandom(MULTIPART_THRESHOLD_BYTES + 1024 * 1024)  # 9 MiB
    src = _write(tmp_path / "mask.nii.gz", data)
    uri = s3_bucket.store.upload_file("r/mask.nii.gz", src, content_type="application/gzip")
    assert uri == f"s3://{s3_bucket.name}/r/mask.nii.gz"
    (info,) = s3_bucket.store.iter_objects("r/")
    assert info.size == len(data)
    assert info.etag.endswith("-2"), info.etag  # two 8 MiB parts
    small = _write(tmp_path / "small.png", data[:1000])
    s3_bucket.store.upload_file("r/small.png", small)
    assert "-" not in s3_bucket.client.head_object(Bucket=s3_bucket.name, Key="r/small.png")["ETag"]
    dest = tmp_path / "back" / "mask.nii.gz"
    s3_bucket.store.download("r/mask.nii.gz", dest)
    assert hashlib.sha256(dest.read_bytes()).digest() == hashlib.sha256(data).digest()


@pytest.mark.integration
def test_s3_wrong_credentials_are_permanent(s3_server: S3Server, s3_bucket: S3Bucket, tmp_path: Path) -> None:
    s3_bucket.store.put_bytes("a", b"x")
    wrong_secret = S3Store(bucket=s3_bucket.name, client=s3_server.client(aws_secret_access_key="wrong"))
    with pytest.raises(StorageError) as info:
        list(wrong_secret.iter_objects(""))
    assert not isinstance(info.value, TransientError) and not info.value.transient
    assert info.value.s3_code == "SignatureDoesNotMatch"
    assert "access key" in info.value.message

    wrong_key = S3Store(bucket=s3_bucket.name, client=s3_server.client(aws_access_key_id="nobody"))
    with pytest.raises(StorageError) as info:
        wrong_key.put_bytes("b", b"x")
    assert info.value.s3_code == "InvalidAccessKeyId"
    with pytest.raises(StorageError) as info:
        wrong_key.upload_file("c", _write(tmp_path / "c.bin", os.urandom(MULTIPART_THRESHOLD_BYTES + 1)))
    assert info.value.s3_code == "InvalidAccessKeyId"
    with pytest.raises(StorageError):
        wrong_key.download_prefix("", tmp_path / "work")
    assert not (tmp_path / "work").exists()


@pytest.mark.integration
def test_s3_missing_key_and_bucket_are_permanent(s3_server: S3Server, s3_bucket: S3Bucket, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFoundError):
        s3_bucket.store.download("nope.dcm", tmp_path / "nope.dcm")
    assert list(tmp_path.iterdir()) == []  # no half-written or temporary file
    no_bucket = S3Store(bucket="ichvol-no-such-bucket", client=s3_bucket.client)
    with pytest.raises(StorageError) as info:
        list(no_bucket.iter_objects(""))
    assert info.value.s3_code == "NoSuchBucket"
    assert not info.value.transient


@pytest.mark.integration
def test_s3_download_prefix(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    store = s3_bucket.store
    for key in ["exports/S1/a.dcm", "exports/S1/sub/b.dcm", "exports/S1/_COMPLETE", "exports/S10/c.dcm"]:
        store.put_bytes(key, key.encode())
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="exports/S1/empty-folder/", Body=b"")
    dest = tmp_path / "work"
    paths = store.download_prefix("exports/S1", dest)
    assert [p.relative_to(dest.resolve()).as_posix() for p in paths] == ["_COMPLETE", "a.dcm", "sub/b.dcm"]
    assert (dest / "sub" / "b.dcm").read_bytes() == b"exports/S1/sub/b.dcm"


@pytest.mark.integration
def test_s3_download_prefix_refuses_control_characters(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    store = s3_bucket.store
    store.put_bytes("S1/a.dcm", b"a")
    store.put_bytes("S1/bad\x01name.dcm", b"b")
    dest = tmp_path / "work"
    with pytest.raises(StudyError) as info:
        store.download_prefix("S1/", dest)
    assert info.value.code is ErrorCode.UNSAFE_PATH
    assert not dest.exists() or not any(dest.iterdir())


@pytest.mark.integration
@pytest.mark.parametrize("bad_key", ["S1/../x", "/S1/abs", "S1/" + "n" * 1000])
def test_s3_download_prefix_refuses_keys_other_servers_accept(
    s3_bucket: S3Bucket, tmp_path: Path, bad_key: str
) -> None:
    # SeaweedFS itself refuses or normalises these names (AWS stores them): hand them over as keys.
    s3_bucket.store.put_bytes("S1/a.dcm", b"a")
    with pytest.raises(StudyError) as info:
        s3_bucket.store.download_prefix("S1/", tmp_path / "work", keys=["S1/a.dcm", bad_key])
    assert info.value.code is ErrorCode.UNSAFE_PATH
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())


# --------------------------------------------------------------------------------------------
# measurements (printed; run with -s to see them)


@pytest.mark.integration
@pytest.mark.slow
def test_measure_s3_listing_speed(s3_bucket: S3Bucket) -> None:
    n = 3000
    _put_many(s3_bucket, [f"exports/S{i // 300:02d}/{i:05d}.dcm" for i in range(n)])
    started = time.perf_counter()
    listed = sum(1 for _ in s3_bucket.store.iter_objects("exports/"))
    elapsed = time.perf_counter() - started
    assert listed == n
    print(f"\nS3 (SeaweedFS, loopback) iter_objects: {n} objects in {elapsed:.3f} s ({n / elapsed:,.0f}/s)")
    assert elapsed < 60


@pytest.mark.slow
def test_measure_local_listing_speed(tmp_path: Path) -> None:
    n = 100_000
    root = tmp_path / "bucket"
    for study in range(100):
        folder = root / "exports" / f"STUDY{study:03d}"
        folder.mkdir(parents=True)
        for i in range(n // 100):
            (folder / f"{i:04d}.dcm").touch()
    started = time.perf_counter()
    count = sum(1 for _ in LocalStore(root).iter_objects("exports/"))
    elapsed = time.perf_counter() - started
    assert count == n
    print(f"\nLocalStore iter_objects: {n} empty files in {elapsed:.2f} s ({n / elapsed:,.0f}/s)")
    assert elapsed < 60
