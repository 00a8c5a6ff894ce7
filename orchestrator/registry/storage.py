"""The storage root: one fsspec URL for datasets, Train/Tune results, the registry and reports.

Writers that must not lose each other's updates (version claims, aliases, the key store) go through
`create_exclusive`, `read_with_version` + `compare_and_swap`, or `update_json`, the retry loop on
those two. How each store makes them atomic:
- local disk: a create is a hard link of a complete temp file, which fails if the name exists (atomic
  on POSIX disks and on NFS); a swap compares and renames under `flock` on a sidecar `<file>.lock`,
  plus a lock per path in this process (Linux's NFS client emulates flock with POSIX locks, which do
  not exclude the threads of one process). flock excludes processes on one host, and on NFSv4 also
  across hosts; a filesystem without working locks loses the guarantee for swaps.
- S3: conditional PUTs, `If-None-Match: *` for a create and `If-Match: <ETag>` for a swap (AWS S3
  since 2024; MinIO and the moto server the tests use honour them too). An S3-compatible store that
  ignores these headers silently loses the guarantee.
- any other fsspec filesystem (memory://, gs://, ...): a lock in this process only. That is exact for
  memory://, which lives in one process; elsewhere a warning says other processes can still collide.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import random
import threading
import time
import uuid
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

log = logging.getLogger(__name__)

_S3_CONDITION_FAILED = ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey")
"""Error codes of a conditional PUT that lost: the condition did not hold (412), a concurrent
conditional write to the key won (409, AWS asks for a retry), or the object to swap is gone (404)."""


class ConcurrentUpdateError(RuntimeError):
    """`update_json` gave up: other writers kept changing the document between its read and its write."""


def join(url: str, *parts: str) -> str:
    """Join path parts onto a storage URL with '/'."""
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts if p)])


def filesystem(url: str) -> Tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem serving `url`, and the path inside it."""
    # Other processes (Ray workers, other jobs, a Serve controller) write the same root: a cached
    # listing would hide their versions and checkpoints from this process for good.
    return fsspec.core.url_to_fs(url, use_listings_cache=False)


def use_s3_server_side_encryption(mode: str, kms_key_id: str = "") -> None:
    """Have every S3 object this process writes from now on request server-side encryption `mode`
    ('AES256', 'aws:kms', 'aws:kms:dsse'; '' sends none, leaving the bucket's default), with KMS key
    `kms_key_id` (empty: the account's default). Other roots are unaffected.

    Through fsspec's own defaults for s3 (`s3_additional_kwargs`, which s3fs adds to each write call):
    every `filesystem()` made afterwards carries it, and so does a pyarrow filesystem pickled to Ray workers.
    """
    sse_keys = ("ServerSideEncryption", "SSEKMSKeyId")
    s3 = fsspec.config.conf.setdefault("s3", {})
    extra = {k: v for k, v in s3.get("s3_additional_kwargs", {}).items() if k not in sse_keys}
    if mode:
        extra["ServerSideEncryption"] = mode
    if mode and kms_key_id:
        extra["SSEKMSKeyId"] = kms_key_id
    s3["s3_additional_kwargs"] = extra


def is_local(url: str) -> bool:
    return isinstance(filesystem(url)[0], LocalFileSystem)


def pyarrow_filesystem(url: str):
    """(pyarrow FileSystem, path) for Ray Train/Tune/Data, which take pyarrow filesystems."""
    import pyarrow.fs

    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        return pyarrow.fs.LocalFileSystem(), path
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write `data` so readers see the old file or the new one, never a torn one.

    Local and most POSIX-like stores rename atomically; on object stores a single PUT is atomic.
    Concurrent writers: the last one wins (see `compare_and_swap` for writes that must not).
    """
    fs, path = filesystem(url)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    else:
        fs.pipe_file(path, data)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    return fs.cat_file(path)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def create_exclusive(url: str, data: bytes) -> bool:
    """Write `data` at `url` only if nothing is there: True if this call created the file, False if
    it existed. Of any number of concurrent callers exactly one gets True; readers never see a
    partial file."""
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        return _local_create_exclusive(path, data)
    if _is_s3(fs):
        return _s3_put_if(fs, path, data, IfNoneMatch="*")
    with _process_lock(path):
        _warn_if_unguarded(fs)
        if fs.exists(path):
            return False
        fs.pipe_file(path, data)
        return True


def read_with_version(url: str) -> Tuple[Optional[bytes], Optional[str]]:
    """(contents, version token) of the file at `url`, or (None, None) when there is none. The token
    is what `compare_and_swap` checks: the object's ETag on S3, the sha256 of the contents elsewhere."""
    fs, path = filesystem(url)
    if _is_s3(fs):
        return _s3_read_with_etag(fs, path)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        return None, None
    return data, _content_token(data)


def compare_and_swap(url: str, data: bytes, expected: Optional[str]) -> bool:
    """Replace the file at `url` with `data` only if its version token is still `expected` (from
    `read_with_version`; None means: only if there is no file yet). True if written, False if another
    writer changed (or created, or removed) it first. Readers see the old file or the new one."""
    if expected is None:
        return create_exclusive(url, data)
    fs, path = filesystem(url)
    if _is_s3(fs):
        return _s3_put_if(fs, path, data, IfMatch=expected)
    with _process_lock(path), _file_lock(fs, path):
        _warn_if_unguarded(fs)
        try:
            current = fs.cat_file(path)
        except FileNotFoundError:
            return False
        if _content_token(current) != expected:
            return False
        write_bytes_atomic(url, data)
        return True


def update_json(url: str, change: Callable[[Any], Any], *, attempts: int = 50) -> Any:
    """Read-modify-write the JSON document at `url` without losing a concurrent writer's update.

    `change` gets the current document (None when there is none yet) and returns the new one. When
    another writer got there first it runs again on a fresh read, so it must only compute; an
    exception from it propagates and leaves the document as it was. Returns the document written.
    Raises ConcurrentUpdateError after `attempts` lost races.
    """
    for attempt in range(attempts):
        data, token = read_with_version(url)
        document = change(None if data is None else json.loads(data))
        if compare_and_swap(url, json.dumps(document, indent=2).encode(), token):
            return document
        # Random backoff: writers that lost together would otherwise collide again together.
        time.sleep(random.uniform(0, min(0.25, 0.005 * 2**attempt)))
    raise ConcurrentUpdateError(f"{url}: gave up after {attempts} attempts, other writers kept changing it")


def _local_create_exclusive(path: str, data: bytes) -> bool:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:
        f.write(data)
    try:
        # link() fails if the name exists, and the file it publishes is already complete
        # (O_CREAT|O_EXCL would be atomic too, but readers could see it half-written).
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def _content_token(data: bytes) -> str:
    # Contents rather than mtime or inode: equal contents make a swap correct (no ABA problem), and
    # mtimes are coarse while inode numbers are reused.
    return hashlib.sha256(data).hexdigest()


_PATH_LOCKS: Dict[str, threading.Lock] = {}
_PATH_LOCKS_GUARD = threading.Lock()
_WARNED: set[str] = set()


@contextlib.contextmanager
def _process_lock(path: str) -> Iterator[None]:
    with _PATH_LOCKS_GUARD:
        lock = _PATH_LOCKS.setdefault(path, threading.Lock())
    with lock:
        yield


@contextlib.contextmanager
def _file_lock(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[None]:
    """flock on `<path>.lock` for local files (kept afterwards: removing a lock file races); nothing elsewhere."""
    if not isinstance(fs, LocalFileSystem):
        yield
        return
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _warn_if_unguarded(fs: fsspec.AbstractFileSystem) -> None:
    name = type(fs).__name__
    if isinstance(fs, (LocalFileSystem, MemoryFileSystem)) or name in _WARNED:
        return
    _WARNED.add(name)
    log.warning("%s has no conditional writes here: concurrent writers in other processes can lose "
                "updates of registry aliases, version numbers and API keys", name)


def _is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "s3" in protocols


def _s3_put_if(fs: Any, path: str, data: bytes, **condition: str) -> bool:
    """One conditional PutObject (s3fs's own client and settings); False if the condition failed."""
    bucket, key, _ = fs.split_path(path)
    try:
        fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
    except OSError as error:  # s3fs turns botocore's ClientError into OSErrors, the ClientError as cause
        response = getattr(error.__cause__, "response", None) or {}
        if response.get("Error", {}).get("Code") in _S3_CONDITION_FAILED:
            return False
        raise
    finally:
        fs.invalidate_cache(path)
    return True


def _s3_read_with_etag(fs: Any, path: str) -> Tuple[Optional[bytes], Optional[str]]:
    """Body and ETag from one GetObject: a HEAD then a GET could pair new contents with an old ETag."""
    bucket, key, _ = fs.split_path(path)

    async def get() -> Tuple[bytes, str]:
        response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        try:
            return await response["Body"].read(), response["ETag"]
        finally:
            response["Body"].close()

    try:
        return fsspec.asyn.sync(fs.loop, get)
    except FileNotFoundError:
        return None, None
