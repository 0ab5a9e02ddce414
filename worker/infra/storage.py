"""Object storage behind one interface: an S3 bucket or a local folder used as a bucket.

The interface, its errors and the key checks are in :mod:`worker.infra.object_store`.
The scheduler lists the PACS export bucket with :meth:`ObjectStore.iter_objects`; the
worker fetches one study folder with :meth:`ObjectStore.download_prefix` and writes its
artefacts with :meth:`ObjectStore.upload_file` / :meth:`ObjectStore.put_bytes`.

Keys are S3 object keys: ``/``-separated, no leading ``/``. A "prefix" names a folder
(``"exports/STUDY123/"``); a missing trailing ``/`` is implied where a folder is meant
(:func:`safe_relative_path`, :meth:`ObjectStore.download_prefix`). Object keys come from
outside (the PACS export, whoever can write to the bucket): no key becomes a local path
without :func:`safe_relative_path`.

Errors: network trouble and server overload (5xx, ``SlowDown``, timeouts, refused
connections) raise :class:`worker.core.errors.TransientError` and are retried by the caller;
everything that will not pass by waiting (missing key or bucket, wrong credentials,
access denied) raises :class:`StorageError` (missing keys: its subclass
:class:`ObjectNotFoundError`). Unsafe keys raise
``StudyError(ErrorCode.UNSAFE_PATH, ...)``: the study itself is unusable.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote, urlsplit

from worker.core.errors import ConfigurationError, IchvolError, StudyError, TransientError
from worker.infra.object_store import (
    TEMP_PREFIX,
    ObjectInfo,
    ObjectNotFoundError,
    ObjectStore,
    StorageError,
    download_prefix,
    safe_relative_path,
    temp_beside,
)

if TYPE_CHECKING:
    from worker.core.settings import Settings

logger = logging.getLogger(__name__)

#: Uploads of this many bytes or more go multipart (boto3 transfer manager), in parts of this size.
MULTIPART_THRESHOLD_BYTES = 8 * 1024 * 1024
MULTIPART_CHUNKSIZE_BYTES = 8 * 1024 * 1024

_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "RequestTimeout",
        "RequestTimeoutException",
        "ServiceUnavailable",
        "InternalError",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "PriorRequestNotComplete",
    }
)
_CREDENTIAL_CODES = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken", "InvalidToken", "403"}
)

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# S3


def make_s3_client(settings: Settings) -> Any:
    """A boto3 S3 client for ``settings`` (endpoint, region, credentials; None: boto3's own chain).

    Path-style addressing (MinIO, SeaweedFS and AWS all accept it), adaptive retries
    (5 attempts), connect and read timeouts from ``ICHVOL_S3_CONNECT_TIMEOUT_S`` and
    ``ICHVOL_S3_READ_TIMEOUT_S`` (5 s and 60 s by default: a server that stalls a request
    costs one timeout, then the request is retried). Thread-safe; create one per process
    after fork.
    """
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": 5, "mode": "adaptive"},
        connect_timeout=settings.s3_connect_timeout_s,
        read_timeout=settings.s3_read_timeout_s,
        s3={"addressing_style": "path"},
    )
    session = boto3.session.Session()
    return session.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.s3_region,
        aws_access_key_id=settings.aws_access_key_id,
        aws_secret_access_key=settings.aws_secret_access_key,
        config=config,
    )


def _client_error_code(exc: BaseException) -> tuple[str, int]:
    response: Any = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def map_s3_error(exc: BaseException, *, what: str) -> IchvolError | None:
    """The project error for a botocore/boto3/s3transfer exception, or None if it is not one.

    ``what`` names the object or bucket for the message (``"s3://bucket/key"``).
    """
    from botocore import exceptions as bce
    from s3transfer.exceptions import RetriesExceededError

    if isinstance(exc, RetriesExceededError):
        last = exc.last_exception
        return TransientError(f"S3 download of {what} failed after retries: {type(last).__name__}: {last}")
    if isinstance(exc, bce.ClientError):
        code, status = _client_error_code(exc)
        if code in _NOT_FOUND_CODES or (status == 404 and code not in {"NoSuchBucket"}):
            return ObjectNotFoundError(f"{what} does not exist", s3_code=code or "404")
        if code == "NoSuchBucket":
            return StorageError(f"the bucket of {what} does not exist", s3_code=code)
        if code in _TRANSIENT_CODES or status >= 500 or status == 429:
            return TransientError(f"S3 is unavailable for {what} ({code or status}); retry later")
        if code in _CREDENTIAL_CODES or status == 403:
            return StorageError(
                f"S3 refused access to {what} ({code or status}): check the access key, the secret "
                "and the bucket policy",
                s3_code=code or "403",
            )
        return StorageError(f"S3 error for {what}: {code or status}", s3_code=code or None)
    if isinstance(exc, bce.NoCredentialsError | bce.PartialCredentialsError):
        return StorageError(f"no usable S3 credentials for {what}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
    if isinstance(
        exc,
        bce.ConnectionError
        | bce.HTTPClientError
        | bce.IncompleteReadError
        | bce.ResponseStreamingError
        | bce.ChecksumError,
    ):
        return TransientError(f"S3 connection trouble for {what}: {type(exc).__name__}")
    if isinstance(exc, bce.BotoCoreError):
        return StorageError(f"S3 client error for {what}: {exc}")
    cause = exc.__cause__ or exc.__context__
    # boto3 wraps some ClientErrors in S3UploadFailedError with only the context set.
    if cause is not None and type(exc).__module__.startswith(("boto3", "s3transfer")):
        return map_s3_error(cause, what=what)
    return None


class S3Store:
    """An S3 bucket (AWS, MinIO, SeaweedFS, ...).

    ``client`` is a boto3 S3 client (see :func:`make_s3_client`); it is shared by all
    calls and thread-safe.
    """

    def __init__(self, *, bucket: str, client: Any) -> None:
        if not bucket or "/" in bucket:
            raise ConfigurationError(f"S3 bucket name must be a plain name, got {bucket!r}")
        self.bucket = bucket
        self.client = client

    @classmethod
    def from_settings(cls, settings: Settings, *, bucket: str) -> S3Store:
        return cls(bucket=bucket, client=make_s3_client(settings))

    def __repr__(self) -> str:
        return f"S3Store(bucket={self.bucket!r})"

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD_BYTES, multipart_chunksize=MULTIPART_CHUNKSIZE_BYTES
        )

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except Exception as exc:
            mapped = map_s3_error(exc, what=what)
            if mapped is None:
                raise
            raise mapped from exc

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def iter_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        """``list_objects_v2`` pages (1000 keys each), fetched as the iterator advances."""
        what = self.uri(prefix)
        paginator = self.client.get_paginator("list_objects_v2")
        pages = iter(paginator.paginate(Bucket=self.bucket, Prefix=prefix))
        while True:
            page: Any = self._call(what, lambda: next(pages, None))
            if page is None:
                return
            for obj in page.get("Contents", ()):
                modified: datetime = obj["LastModified"]
                if modified.tzinfo is None:
                    modified = modified.replace(tzinfo=UTC)
                yield ObjectInfo(
                    key=str(obj["Key"]),
                    etag=str(obj.get("ETag", "")).strip('"'),
                    size=int(obj.get("Size", 0)),
                    last_modified=modified.astimezone(UTC),
                )

    def download(self, key: str, dest: Path) -> None:
        def run() -> None:
            with temp_beside(dest) as (_, fh):
                self.client.download_fileobj(self.bucket, key, fh, Config=self._transfer_config())

        self._call(self.uri(key), run)

    def upload_file(self, key: str, src: Path, *, content_type: str | None = None) -> str:
        extra = {"ContentType": content_type} if content_type else None

        def run() -> None:
            with open(src, "rb") as fh:
                self.client.upload_fileobj(fh, self.bucket, key, ExtraArgs=extra, Config=self._transfer_config())

        self._call(self.uri(key), run)
        return self.uri(key)

    def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None) -> str:
        extra: dict[str, Any] = {"ContentType": content_type} if content_type else {}
        self._call(self.uri(key), lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=data, **extra))
        return self.uri(key)

    def exists(self, key: str) -> bool:
        try:
            self._call(self.uri(key), lambda: self.client.head_object(Bucket=self.bucket, Key=key))
        except ObjectNotFoundError:
            return False
        return True

    def delete(self, key: str) -> None:
        self._call(self.uri(key), lambda: self.client.delete_object(Bucket=self.bucket, Key=key))

    def download_prefix(self, prefix: str, dest_dir: Path, *, keys: Sequence[str] | None = None) -> list[Path]:
        return download_prefix(self, prefix, dest_dir, keys)


# --------------------------------------------------------------------------------------------
# a local folder as a bucket


def _local_etag(st: os.stat_result) -> str:
    # Cheap and stable: a 100,000-object poll must not read file contents.
    return f"{st.st_mtime_ns:x}-{st.st_size:x}"


def _utc_from_ns(mtime_ns: int) -> datetime:
    return datetime.fromtimestamp(mtime_ns / 1e9, tz=UTC)


def _sort_name(entry: os.DirEntry[str]) -> bytes:
    # S3 lists keys in UTF-8 byte order; a folder sorts as "name/" so "a-b" < "a/x" < "ab".
    name = entry.name + "/" if entry.is_dir(follow_symlinks=False) else entry.name
    return name.encode("utf-8", "surrogateescape")


class LocalStore:
    """A folder used as a bucket: key ``"a/b.dcm"`` is the file ``root/a/b.dcm``.

    For the embedded default (no services) and tests. Listings return regular files
    only: symbolic links, other special files and our own temporary files are skipped, so
    a link cannot expose files outside ``root``. Folders are created on write and left
    in place on delete.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().absolute()

    def __repr__(self) -> str:
        return f"LocalStore(root={str(self.root)!r})"

    def _path(self, key: str) -> Path:
        try:
            rel = safe_relative_path(key, "")
        except StudyError as exc:
            raise StorageError(f"not a usable key for a local folder: {exc.message}") from None
        return self.root.joinpath(*rel.parts)

    def _inside(self, path: Path) -> bool:
        """Whether ``path`` stays inside ``root`` once symbolic links are followed."""
        return path.resolve().is_relative_to(self.root.resolve())

    @contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        try:
            yield
        except FileNotFoundError:
            raise ObjectNotFoundError(f"{self.uri(key)} does not exist") from None
        except OSError as exc:
            raise StorageError(f"cannot access {self.uri(key)}: {exc.strerror or exc}") from None

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def iter_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        """Walk ``root`` (only the folders ``prefix`` can reach), in S3 key order."""
        if not self.root.is_dir():
            raise StorageError(f"the folder {self.root} does not exist")
        # Start at the deepest folder the prefix names in full: "a/b/STU" -> root/a/b.
        folder, _, _ = prefix.rpartition("/")
        start = self._path(folder) if folder else self.root
        if not self._inside(start):
            return  # a symbolic link out of root: not part of this bucket
        base = folder + "/" if folder else ""
        yield from self._walk(start, base, prefix)

    def _walk(self, directory: Path, base: str, prefix: str) -> Iterator[ObjectInfo]:
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=_sort_name)
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            raise StorageError(f"cannot list {directory}: {exc.strerror}") from None
        for entry in entries:
            key = base + entry.name
            if entry.name.startswith(TEMP_PREFIX):
                continue
            if entry.is_dir(follow_symlinks=False):
                sub = key + "/"
                # Descend only where keys below can still match the prefix.
                if sub.startswith(prefix) or prefix.startswith(sub):
                    yield from self._walk(Path(entry.path), sub, prefix)
            elif entry.is_file(follow_symlinks=False) and key.startswith(prefix):
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed while listing
                yield ObjectInfo(
                    key=key, etag=_local_etag(st), size=st.st_size, last_modified=_utc_from_ns(st.st_mtime_ns)
                )

    def download(self, key: str, dest: Path) -> None:
        src = self._path(key)
        with self._errors(key):
            if not src.is_file() or not self._inside(src):
                raise FileNotFoundError(src)
            with open(src, "rb") as fin, temp_beside(dest) as (_, fout):
                shutil.copyfileobj(fin, fout, 1024 * 1024)

    def upload_file(self, key: str, src: Path, *, content_type: str | None = None) -> str:
        target = self._path(key)
        with open(src, "rb") as fin, self._errors(key), temp_beside(target) as (_, fout):
            shutil.copyfileobj(fin, fout, 1024 * 1024)
        return target.as_uri()

    def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None) -> str:
        target = self._path(key)
        with self._errors(key), temp_beside(target) as (_, fout):
            fout.write(data)
        return target.as_uri()

    def exists(self, key: str) -> bool:
        path = self._path(key)
        return path.is_file() and not path.is_symlink() and self._inside(path)

    def delete(self, key: str) -> None:
        with self._errors(key):
            self._path(key).unlink(missing_ok=True)

    def download_prefix(self, prefix: str, dest_dir: Path, *, keys: Sequence[str] | None = None) -> list[Path]:
        return download_prefix(self, prefix, dest_dir, keys)


# --------------------------------------------------------------------------------------------


def open_store(uri_or_bucket: str, settings: Settings) -> ObjectStore:
    """The store a setting names.

    * ``"s3://bucket"`` (a trailing ``/`` is allowed; no key path) -> :class:`S3Store`;
    * ``"file:///abs/path"`` -> :class:`LocalStore`;
    * a path (``/data/exports``, ``./exports``, ``~/x``, anything with a ``/``) -> LocalStore;
    * a bare name (``"pacs-export"``) -> the S3 bucket of that name.
    """
    value = uri_or_bucket.strip()
    if not value:
        raise ConfigurationError("empty bucket or folder name")
    parts = urlsplit(value)
    if parts.scheme == "s3":
        if parts.path.strip("/") or parts.query or parts.fragment or not parts.netloc:
            raise ConfigurationError(f"expected s3://bucket (no key path), got {value!r}")
        return S3Store.from_settings(settings, bucket=parts.netloc)
    if parts.scheme == "file":
        if parts.netloc not in {"", "localhost"} or not parts.path:
            raise ConfigurationError(f"expected file:///absolute/path, got {value!r}")
        return LocalStore(Path(unquote(parts.path)))
    if "://" in value:
        raise ConfigurationError(f"unsupported storage URI {value!r}: use s3://bucket or file:///path")
    if "/" in value or value.startswith(("~", ".")) or os.sep in value:
        return LocalStore(Path(value))
    return S3Store.from_settings(settings, bucket=value)
