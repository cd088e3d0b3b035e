"""How long a scheduled rerun takes to decide what to skip, for an output that already holds every mask.

    python -m benchmarks.skip_decision [--cases 5000] [--json results.json]

The decision of `trtseg predict` (trtseg.pipeline.select_cases after trtseg.dataset.list_cases): one listing of the
input, one of the output and one of its ledger (trtseg/ledger.py), on a local disk and on moto's S3 server on
loopback, with the S3 API requests counted by name. Inputs, masks and ledger entries are tiny placeholder files:
the decision never opens them.
"""
from __future__ import annotations

import argparse
import collections
import os
import socket
import tempfile
import time

from benchmarks.common import machine, save
from trtseg import ledger, synthetic as syn
from trtseg.dataset import list_cases
from trtseg.model_folder import load_model_folder
from trtseg.options import Settings
from trtseg.pipeline import select_cases, stamp


def _fill(root: str, n: int, model, settings: Settings, put) -> None:
    """n inputs; then, from the input's own listing, each case's mask and ledger entry, as a finished run leaves
    them."""
    put({f"{root}/in/case{i:06d}_0000.nii.gz": b"x" * 64 for i in range(n)})
    cases = list_cases(f"{root}/in", 1, storage_options=None)
    settings_key = ledger.key(stamp(model, settings))
    put({f"{root}/out/{c.case_id}.nii.gz": b"m" * 100 for c in cases})
    masks = ledger.outputs(f"{root}/out")
    put({f"{root}/out/{ledger.LEDGER}/"
         + ledger.Entry(c.case_id, settings_key, ledger.key(c.identity), masks[f"{c.case_id}.nii.gz"]).name: b"{}"
         for c in cases})


def _decide(root: str, model, settings: Settings) -> tuple[float, int, int]:
    t = time.perf_counter()
    cases = list_cases(f"{root}/in", 1)
    todo, skipped = select_cases(cases, f"{root}/out", model, settings, overwrite=False)
    return time.perf_counter() - t, len(todo), len(skipped)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=5000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="trtseg_skip_")
    model = load_model_folder(syn.make_model_folder(os.path.join(work, "model"), patch_size=(16, 16, 16),
                                                    features=(4, 8)))
    settings = Settings()
    out = {"scenario": "skip_decision", "machine": machine(), "cases": args.cases}

    def put_local(files: dict) -> None:
        for path, data in files.items():
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
    local = os.path.join(work, "local")
    _fill(local, args.cases, model, settings, put_local)
    seconds, todo, skipped = _decide(local, model, settings)
    out["local"] = {"seconds": round(seconds, 3), "seconds_per_1000_cases": round(1000 * seconds / args.cases, 3),
                    "to_run": todo, "skipped": skipped}
    print(out["local"], flush=True)

    import fsspec
    import s3fs
    from moto.server import ThreadedMotoServer
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        opts = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}",
                                                             "region_name": "us-east-1"}}
        import boto3
        boto3.client("s3", endpoint_url=opts["client_kwargs"]["endpoint_url"], aws_access_key_id="k",
                     aws_secret_access_key="s", region_name="us-east-1").create_bucket(Bucket="bench")
        fs = s3fs.S3FileSystem(**opts)
        from trtseg import storage
        storage.set_default_options(opts)
        _fill("s3://bench", args.cases, model, settings,
              lambda files: fs.pipe({k.removeprefix("s3://"): v for k, v in files.items()}))
        calls: collections.Counter = collections.Counter()
        original = s3fs.S3FileSystem._call_s3

        async def counting(self, method, *a, **kw):
            calls[method if isinstance(method, str) else getattr(method, "__name__", str(method))] += 1
            return await original(self, method, *a, **kw)

        s3fs.S3FileSystem._call_s3 = counting
        fsspec.filesystem("s3", **opts).invalidate_cache()
        try:
            seconds, todo, skipped = _decide("s3://bench", model, settings)
        finally:
            s3fs.S3FileSystem._call_s3 = original
        out["s3_moto_loopback"] = {"seconds": round(seconds, 3),
                                   "seconds_per_1000_cases": round(1000 * seconds / args.cases, 3),
                                   "to_run": todo, "skipped": skipped, "s3_requests": dict(calls),
                                   "note": "list_objects_v2 pages hold 1000 keys: three prefixes of N objects take "
                                           "about 3 * N / 1000 list requests"}
        print(out["s3_moto_loopback"], flush=True)
    finally:
        server.stop()
    save(out, args.json)


if __name__ == "__main__":
    main()
