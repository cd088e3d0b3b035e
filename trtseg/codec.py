"""gzip for NIfTI bytes: Intel ISA-L's igzip (the `isal` package) when it is installed, else zlib.

Both write and read standard gzip streams; files written with one read with the other. igzip decompresses about
twice as fast as zlib and compresses 10 to 20 times faster at its levels 1 to 3 (tests and figures in
BENCHMARKS.md). Levels: 0-3 use igzip where available (its range), 4-9 use zlib. nnU-Net (SimpleITK) writes
zlib level 6, which stays the default.
"""
from __future__ import annotations

import gzip
import zlib

try:
    from isal import igzip as _igzip
except ImportError:  # optional: plain zlib then
    _igzip = None


def backend() -> str:
    return "isal" if _igzip is not None else "zlib"


def compress(data: bytes, level: int = 6) -> bytes:
    if _igzip is not None and level <= 3:
        return _igzip.compress(data, compresslevel=max(0, level), mtime=0)
    return gzip.compress(data, compresslevel=level, mtime=0)


def decompress(data: bytes) -> bytes:
    """Raises EOFError, OSError or zlib.error for a truncated or corrupt stream."""
    if _igzip is not None:
        return _igzip.decompress(data)
    return gzip.decompress(data)


ERRORS: tuple[type[BaseException], ...] = (EOFError, OSError, zlib.error)
