"""Storage: every file trtseg reads or writes goes through fsspec, so local paths, file://, s3://, gs:// and
memory:// all work the same way.

Writes are atomic: a reader never sees a half-written file. On a local filesystem the bytes go to a temporary name
in the same folder and are renamed over the target (``os.replace``); on object stores a single PUT is already
all-or-nothing, so the object is written in one request and never exists partially.
"""
from __future__ import annotations

import os
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

StorageOptions = dict[str, Any]


def filesystem(url: str, storage_options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Returns (filesystem, path inside it) for a URL or a local path."""
    fs, path = fsspec.core.url_to_fs(str(url), **(storage_options or {}))
    return fs, path


def join(base: str, *parts: str) -> str:
    """Joins URL or path parts with '/', keeping the protocol of ``base``."""
    out = str(base).rstrip("/")
    for p in parts:
        out += "/" + str(p).strip("/")
    return out


def read_bytes(url: str, storage_options: StorageOptions | None = None) -> bytes:
    fs, path = filesystem(url, storage_options)
    return fs.cat_file(path)


def exists(url: str, storage_options: StorageOptions | None = None) -> bool:
    fs, path = filesystem(url, storage_options)
    return fs.exists(path)


def write_bytes_atomic(url: str, data: bytes, storage_options: StorageOptions | None = None) -> None:
    """Writes ``data`` to ``url`` so that the target either does not exist or holds all of ``data``."""
    fs, path = filesystem(url, storage_options)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if isinstance(fs, LocalFileSystem):
        if parent:
            os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent or ".", f".{os.path.basename(path)}.{uuid.uuid4().hex}.part")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    else:
        if parent:
            try:
                fs.makedirs(parent, exist_ok=True)
            except Exception:  # object stores have no folders; some backends refuse makedirs
                pass
        fs.pipe_file(path, data)
