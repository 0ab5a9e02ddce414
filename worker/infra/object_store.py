"""The object-store interface: what every store offers, and turning outside keys into safe local paths.

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

The stores themselves (S3, a local folder) and :func:`~worker.infra.storage.open_store`
are in :mod:`worker.infra.storage`.
"""

from __future__ import annotations

import os
import unicodedata
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import IO, Protocol

from worker.core.errors import ErrorCode, IchvolError, StudyError

#: Longest file or folder name most file systems accept (ext4, XFS, APFS), in UTF-8 bytes.
MAX_NAME_BYTES = 255
#: Our own temporary files start with this; LocalStore listings skip them.
TEMP_PREFIX = ".ichvol-tmp-"


class StorageError(IchvolError):
    """A permanent object-storage failure: missing bucket or key, bad credentials, access denied.

    ``s3_code`` is the S3 error code (``"NoSuchBucket"``, ``"AccessDenied"``, ...) when
    there is one. Not retried: waiting does not fix it.
    """

    def __init__(self, message: str, *, s3_code: str | None = None) -> None:
        super().__init__(message)
        self.s3_code = s3_code


class ObjectNotFoundError(StorageError):
    """The key does not exist (S3 ``NoSuchKey`` / 404, or no such file in a LocalStore)."""


@dataclass(frozen=True)
class ObjectInfo:
    """One object as listed.

    ``etag`` is opaque and unquoted: on S3 the server's ETag (an MD5 for single-part
    uploads, ``"<md5>-<parts>"`` for multipart ones); in a :class:`~worker.infra.storage.LocalStore` a token
    from size and modification time. It changes when the object changes.
    ``size`` is in bytes; ``last_modified`` is timezone-aware UTC.
    """

    key: str
    etag: str
    size: int
    last_modified: datetime


class ObjectStore(Protocol):
    """A bucket: S3 (:class:`~worker.infra.storage.S3Store`) or a folder (:class:`~worker.infra.storage.LocalStore`)."""

    def iter_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, lazily, in key order."""
        ...

    def download(self, key: str, dest: Path) -> None:
        """Write the object to ``dest`` (via a temporary file and a rename: never half-written)."""
        ...

    def upload_file(self, key: str, src: Path, *, content_type: str | None = None) -> str:
        """Store the file ``src`` under ``key``; returns :meth:`uri` of the key."""
        ...

    def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None) -> str:
        """Store ``data`` under ``key``; returns :meth:`uri` of the key."""
        ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None:
        """Remove the object; a missing key is not an error."""
        ...

    def uri(self, key: str) -> str:
        """``"s3://bucket/key"`` or ``"file:///abs/path"``."""
        ...

    def download_prefix(self, prefix: str, dest_dir: Path, *, keys: Sequence[str] | None = None) -> list[Path]:
        """Download the folder ``prefix`` (or only ``keys`` below it) into ``dest_dir``.

        Every key is checked with :func:`safe_relative_path` before anything is written;
        files land at ``dest_dir / <key relative to prefix>``. Returns the paths written,
        in key order. Folder markers (keys ending in ``/``) are skipped.
        """
        ...


# --------------------------------------------------------------------------------------------
# keys -> local paths


def _folder_prefix(prefix: str) -> str:
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


def _shown(key: str) -> str:
    """The key for a message: ASCII-escaped, at most 80 characters."""
    text = ascii(key)[1:-1]
    return text if len(text) <= 80 else text[:77] + "..."


def safe_relative_path(key: str, prefix: str) -> PurePosixPath:
    """The path of ``key`` relative to the folder ``prefix``, or ``StudyError(UNSAFE_PATH)``.

    ``prefix`` is a folder (``"exports/STUDY123/"``; ``""`` is the bucket root; a
    missing trailing ``/`` is added). The key must lie below it, and the rest must be a
    plain relative path: no ``..`` or ``.`` parts, no leading ``/``, no empty parts
    (``a//b``, trailing ``/``), no backslash, no NUL or other control characters, valid
    UTF-8, and every part at most 255 bytes. The result can be joined to a local folder
    without leaving it (given that folder holds no symbolic links; the download code
    also checks the joined path).
    """
    folder = _folder_prefix(prefix)

    def unsafe(reason: str) -> StudyError:
        return StudyError(
            ErrorCode.UNSAFE_PATH,
            f"the study holds a file whose name is unsafe to store ('{_shown(key)}': {reason}); "
            "re-export the study with plain file names",
        )

    if any(unicodedata.category(ch) == "Cc" for ch in key):
        raise unsafe("control character in the name")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise unsafe("the name is not valid UTF-8") from None
    if not key.startswith(folder):
        raise unsafe(f"not inside the study folder '{_shown(folder)}'")
    rest = key[len(folder) :]
    if not rest:
        raise unsafe("the name is empty")
    if rest.startswith("/"):
        raise unsafe("absolute path")
    if "\\" in rest:
        raise unsafe("backslash in the name")
    parts = rest.split("/")
    for part in parts:
        if part == "":
            raise unsafe("empty folder name ('//' or a trailing '/')")
        if part in {".", ".."}:
            raise unsafe(f"'{part}' in the path")
        if len(part.encode("utf-8")) > MAX_NAME_BYTES:
            raise unsafe(f"a name longer than {MAX_NAME_BYTES} bytes")
    return PurePosixPath(*parts)


def _plan_downloads(keys: Iterable[str], prefix: str, dest_dir: Path) -> list[tuple[str, Path]]:
    """Check every key first (nothing is written for a study with one bad key)."""
    root = dest_dir.resolve()
    planned: list[tuple[str, Path]] = []
    files: set[PurePosixPath] = set()
    folders: set[PurePosixPath] = set()
    for key in sorted(set(keys)):
        if key.endswith("/"):
            continue  # a folder marker made by S3 consoles: nothing to write
        rel = safe_relative_path(key, prefix)
        # "a/b" and "a/b/c" can both be S3 keys but not both be files on disk.
        if rel in folders or any(parent in files for parent in rel.parents):
            raise StudyError(
                ErrorCode.UNSAFE_PATH,
                f"the study holds both a file and a folder named '{_shown(str(rel))}'; "
                "re-export the study with plain file names",
            )
        files.add(rel)
        folders.update(rel.parents)
        target = root.joinpath(*rel.parts)
        planned.append((key, target))
    return planned


def download_prefix(store: ObjectStore, prefix: str, dest_dir: Path, keys: Sequence[str] | None) -> list[Path]:
    """:meth:`ObjectStore.download_prefix` for any store: plan every key first, then download."""
    folder = _folder_prefix(prefix)
    if keys is None:
        keys = [info.key for info in store.iter_objects(folder)]
    planned = _plan_downloads(keys, folder, dest_dir)
    root = dest_dir.resolve()
    root.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for key, target in planned:
        target.parent.mkdir(parents=True, exist_ok=True)
        # A symbolic link already inside dest_dir must not carry the file elsewhere.
        if not target.parent.resolve().is_relative_to(root):
            raise StudyError(
                ErrorCode.UNSAFE_PATH,
                f"'{_shown(key)}' would be written outside the download folder; "
                "re-export the study with plain file names",
            )
        store.download(key, target)
        written.append(target)
    return written


# --------------------------------------------------------------------------------------------
# temporary files and renames


@contextmanager
def temp_beside(dest: Path) -> Iterator[tuple[Path, IO[bytes]]]:
    """A temporary file in ``dest``'s folder, renamed onto ``dest`` on success, removed on error."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f"{TEMP_PREFIX}{uuid.uuid4().hex}"
    try:
        with open(tmp, "xb") as fh:
            yield tmp, fh
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
