"""Storage: every file trtseg reads or writes goes through fsspec, so local paths, file://, s3://, gs:// and
memory:// all work the same way.

Writes are atomic: a reader never sees a half-written file. On a local filesystem the bytes go to a temporary name
in the same folder and are renamed over the target (``os.replace``); on object stores a single PUT is already
all-or-nothing, so the object is written in one request and never exists partially.
"""
from __future__ import annotations

import os
import socket
import time
import uuid
from typing import Any, Callable, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

StorageOptions = dict[str, Any]
T = TypeVar("T")

#: transient storage errors (a store that stops for a few seconds, 5xx answers, dropped connections) are retried
#: this many times in all, with exponential backoff from RETRY_BASE_SECONDS (jittered): about 12 s in all
RETRY_ATTEMPTS = int(os.environ.get("TRTSEG_STORAGE_ATTEMPTS", "5"))
RETRY_BASE_SECONDS = float(os.environ.get("TRTSEG_STORAGE_BACKOFF", "1.0"))
_PERMANENT = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, ValueError, TypeError)


def retrying(fn: Callable[[], T], what: str = "") -> T:
    """Calls ``fn``; a transient failure is retried with jittered exponential backoff (tenacity), a permanent one
    (missing file, access denied, bad argument) or the last attempt's failure is raised as it is.

    Retried here rather than by each client's own settings: s3fs, gcsfs and local files each retry differently or
    not at all, and a store that stops for seconds must look the same to every path."""
    import tenacity

    retry = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(RETRY_ATTEMPTS),
        # 0.75, 1.5, 3, 6 x the base plus up to half the base of jitter: growing gaps, about 12 s over 5 attempts
        wait=tenacity.wait_exponential_jitter(multiplier=0.75 * RETRY_BASE_SECONDS, jitter=0.5 * RETRY_BASE_SECONDS,
                                              max=60 * RETRY_BASE_SECONDS),
        retry=tenacity.retry_if_not_exception_type(_PERMANENT), reraise=True)
    return retry(fn)

_default_options: StorageOptions = {}


def set_default_options(storage_options: StorageOptions | None) -> None:
    """Options used by every call of this process that passes none (the job sets them in each Ray worker)."""
    global _default_options
    _default_options = dict(storage_options or {})


def filesystem(url: str, storage_options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Returns (filesystem, path inside it) for a URL or a local path."""
    opts = storage_options if storage_options is not None else _default_options
    protocol = str(url).split("://", 1)[0] if "://" in str(url) else "file"
    fs, path = fsspec.core.url_to_fs(str(url), **(opts if protocol not in ("file", "local") else {}))
    return fs, path


def redact(text: str, storage_options: StorageOptions | None = None) -> str:
    """``text`` with every secret-looking value of the storage options replaced by ***."""
    opts = storage_options if storage_options is not None else _default_options
    secrets: list[str] = []

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                if isinstance(x, (dict, list)):
                    walk(x)
                elif isinstance(x, str) and len(x) >= 4 and any(w in str(k).lower() for w in
                                                                ("secret", "key", "token", "password", "credential")):
                    secrets.append(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(opts)
    for sec in sorted(secrets, key=len, reverse=True):
        text = text.replace(sec, "***")
    return text


def join(base: str, *parts: str) -> str:
    """Joins URL or path parts with '/', keeping the protocol of ``base``."""
    out = str(base).rstrip("/")
    for p in parts:
        out += "/" + str(p).strip("/")
    return out


def _local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def read_bytes(url: str, storage_options: StorageOptions | None = None) -> bytes:
    fs, path = filesystem(url, storage_options)
    return fs.cat_file(path) if _local(fs) else retrying(lambda: fs.cat_file(path), url)


def exists(url: str, storage_options: StorageOptions | None = None) -> bool:
    fs, path = filesystem(url, storage_options)
    return fs.exists(path) if _local(fs) else retrying(lambda: fs.exists(path), url)


def write_bytes_atomic(url: str, data: bytes, storage_options: StorageOptions | None = None) -> None:
    """Writes ``data`` to ``url`` so that the target either does not exist or holds all of ``data``."""
    fs, path = filesystem(url, storage_options)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if isinstance(fs, LocalFileSystem):
        if parent:
            os.makedirs(parent, exist_ok=True)
        # the writer's host and pid in the name: remove_stale_parts leaves a live writer's file alone
        tmp = os.path.join(parent or ".", f".{os.path.basename(path)}.{_WRITER}.{uuid.uuid4().hex}.part")
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
        # object stores have no folders to make (and makedirs on s3fs would try to create a missing bucket);
        # one PUT is all-or-nothing, and repeating it after a transient failure is harmless
        retrying(lambda: fs.pipe_file(path, data), url)


_HOST = socket.gethostname().replace(".", "_")
_WRITER = f"{_HOST}-{os.getpid()}"
_PART_AGE_OTHER_HOST = 24 * 3600  # a part written from another host (a shared file system) is stale after a day


def _stale(folder: str, name: str) -> bool:
    """A temporary file a writer left behind: its writer, on this host, is no longer running (or, written from
    another host, it is a day old). Another job writing into the same output (a shard) keeps its files."""
    parts = name.split(".")
    writer = parts[-3] if len(parts) >= 4 else ""
    host, _, pid = writer.rpartition("-")
    if host == _HOST and pid.isdigit():
        try:
            os.kill(int(pid), 0)
            return False
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    if host:  # another host
        return time.time() - os.path.getmtime(os.path.join(folder, name)) > _PART_AGE_OTHER_HOST
    return True  # an older run's name, without a writer


def remove_stale_parts(url: str, storage_options: StorageOptions | None = None) -> int:
    """Deletes temporary files (``.NAME.<host>-<pid>.<hex>.part``) that a killed run left in a local output folder,
    and only those: a writer that still runs (another shard's job) keeps its files."""
    fs, path = filesystem(url, storage_options)
    if not _local(fs) or not os.path.isdir(path):
        return 0
    removed = 0
    for folder in (path, os.path.join(path, ".trtseg", "ledger"), os.path.join(path, ".trtseg", "runs")):
        if os.path.isdir(folder):
            for f in os.listdir(folder):
                if f.startswith(".") and f.endswith(".part") and _stale(folder, f):
                    try:
                        os.unlink(os.path.join(folder, f))
                        removed += 1
                    except FileNotFoundError:  # its writer renamed it meanwhile
                        pass
    return removed


def check_writable(url: str, storage_options: StorageOptions | None = None) -> None:
    """Writes and deletes a small probe under ``url``; raises TrtsegError naming the URL and the cause."""
    from trtseg.errors import TrtsegError, one_line

    probe = join(url, f".trtseg-probe-{uuid.uuid4().hex}")
    try:
        write_bytes_atomic(probe, b"", storage_options)
        fs, path = filesystem(probe, storage_options)
        fs.rm(path)
    except Exception as e:
        raise TrtsegError(redact(f"{url}: output location is not writable ({one_line(e, 300)})",
                                 storage_options)) from None
