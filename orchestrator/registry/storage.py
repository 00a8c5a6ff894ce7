"""The storage root: one fsspec URL for datasets, Train/Tune results, the registry and reports."""

from __future__ import annotations

import uuid
from typing import Tuple

import fsspec
from fsspec.implementations.local import LocalFileSystem


def join(url: str, *parts: str) -> str:
    """Join path parts onto a storage URL with '/'."""
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts if p)])


def filesystem(url: str) -> Tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem serving `url`, and the path inside it."""
    # Other processes (Ray workers, other jobs, a Serve controller) write the same root: a cached
    # listing would hide their versions and checkpoints from this process for good.
    return fsspec.core.url_to_fs(url, use_listings_cache=False)


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
