"""gzip on the read path: decompressing one CT-sized .nii.gz with zlib, igzip and rapidgzip at several thread counts,
and `read_case` end to end with the serial and the parallel path.

    python -m benchmarks.gzip_read [--shape 512 512 240] [--threads 2 4 8 16] [--repeats 5] [--json out.json]

The file is the CT-like volume of case_latency (int16), written by nibabel (zlib level 6, as SimpleITK and most
tools write). Each figure is the median of --repeats runs over bytes already in memory (decompression) or a file in
the page cache (read_case).
"""
from __future__ import annotations

import argparse
import gzip
import os
import statistics
import tempfile
import time
import zlib

from benchmarks.common import machine, save
from trtseg import codec
from trtseg import synthetic as syn
from trtseg.read import read_case


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(statistics.median(times), 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", nargs=3, type=int, default=[512, 512, 240])
    ap.add_argument("--threads", nargs="+", type=int, default=[2, 4, 8, 16])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    path = os.path.join(tempfile.mkdtemp(prefix="trtseg_gzip_"), "ct_0000.nii.gz")
    syn.save_nifti(path, syn.ct_like_volume(args.shape, seed=0), syn.affine_for((0.7, 0.7, 1.25)))
    data = open(path, "rb").read()
    raw = gzip.decompress(data)
    result = {"scenario": "gzip_read", "machine": machine(), "shape_xyz": args.shape,
              "compressed_mb": round(len(data) / 2 ** 20, 1), "raw_mb": round(len(raw) / 2 ** 20, 1),
              "decompress_seconds": {"zlib": _median_seconds(lambda: zlib.decompress(data, 31), args.repeats)}}
    if codec._igzip is not None:
        result["decompress_seconds"]["isal"] = _median_seconds(lambda: codec._igzip.decompress(data), args.repeats)
    if codec._rapidgzip is not None:
        for n in args.threads:
            assert codec._parallel_decompress(data, n) == raw
            result["decompress_seconds"][f"rapidgzip_{n}"] = _median_seconds(
                lambda: codec._parallel_decompress(data, n), args.repeats)
    result["read_case_seconds"] = {}
    for label, threads in [("serial", "1"), ("parallel_default", "")]:
        os.environ["TRTSEG_GZIP_THREADS"] = threads
        if not threads:
            del os.environ["TRTSEG_GZIP_THREADS"]
        result["read_case_seconds"][f"{label} ({codec.backend()}, {codec.gzip_threads()} threads)"] = \
            _median_seconds(lambda: read_case([path], 1), args.repeats)
    print(result)
    save(result, args.json)


if __name__ == "__main__":
    main()
