"""gzip for NIfTI bytes: Intel ISA-L's igzip (the `isal` package) when it is installed, else zlib; and, for large
streams on machines with cores to spare, rapidgzip's parallel decompression.

Both write and read standard gzip streams; files written with one read with the other. igzip decompresses about
twice as fast as zlib and compresses 10 to 20 times faster at its levels 1 to 3 (tests and figures in
BENCHMARKS.md). Levels: 0-3 use igzip where available (its range), 4-9 use zlib. nnU-Net (SimpleITK) writes
zlib level 6, which stays the default.

Decompression of one gzip stream is serial in igzip and zlib. rapidgzip (a core dependency beside isal) splits a
stream at deflate block boundaries and decompresses the pieces on several threads, checking the CRC32; it is used
for streams of at least PARALLEL_MIN_BYTES when TRTSEG_GZIP_THREADS (default: the cores this process may use, at
most 8) is 4 or more. Its result is trusted only when its length matches the stream's own size field (ISIZE):
anything else (a truncated stream, a multi-member file, any rapidgzip error) is decompressed again serially, which
gives the exact bytes or the usual error.
"""
from __future__ import annotations

import gzip
import io
import os
import zlib

try:
    from isal import igzip as _igzip
except ImportError:  # optional: plain zlib then
    _igzip = None

try:
    import rapidgzip as _rapidgzip
except ImportError:  # optional: serial decompression then
    _rapidgzip = None

PARALLEL_MIN_BYTES = 8 * 2 ** 20


def gzip_threads() -> int:
    """Threads for parallel decompression: $TRTSEG_GZIP_THREADS, else the usable cores (at most 8)."""
    env = os.environ.get("TRTSEG_GZIP_THREADS")
    if env:
        return max(1, int(env))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return min(8, cores)


def backend() -> str:
    serial = "isal" if _igzip is not None else "zlib"
    return f"{serial}+rapidgzip" if _rapidgzip is not None and gzip_threads() >= 4 else serial


def compress(data: bytes, level: int = 6) -> bytes:
    if _igzip is not None and level <= 3:
        return _igzip.compress(data, compresslevel=max(0, level), mtime=0)
    return gzip.compress(data, compresslevel=level, mtime=0)


def decompress(data: bytes) -> bytes:
    """Raises EOFError, OSError or zlib.error for a truncated or corrupt stream."""
    threads = gzip_threads()
    if _rapidgzip is not None and threads >= 4 and len(data) >= PARALLEL_MIN_BYTES:
        out = _parallel_decompress(data, threads)
        if out is not None:
            return out
    if _igzip is not None:
        return _igzip.decompress(data)
    return gzip.decompress(data)


ERRORS: tuple[type[BaseException], ...] = (EOFError, OSError, zlib.error)


def _parallel_decompress(data: bytes, threads: int) -> bytes | None:
    """rapidgzip's result when it is certainly the whole stream, else None (the caller decompresses serially)."""
    try:
        with _rapidgzip.open(io.BytesIO(data), parallelization=threads) as f:
            out = f.read()
    except Exception:
        return None
    return out if len(out) % 2 ** 32 == int.from_bytes(data[-4:], "little") else None
