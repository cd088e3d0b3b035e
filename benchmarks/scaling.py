"""Scaling: the same CT volumes through the Ray job with 1, 2 and 4 inference actors.

    python -m benchmarks.scaling [--cases 8] [--actors 1 2 4] [--json results.json]

Where only one GPU exists the actors share it through fractional GPUs (0.8/N each, leaving 0.2 for the
preprocessing tasks). What that shows: that tiles of one volume spread over several actors, what the spreading
costs (partial sums shipped between actors) and whether several engines on one GPU overlap better than one.
What it does not show: multi-GPU speed-up, which needs several GPUs (the per-actor figures are the input for that
estimate, not a measurement of it).

Per run: volumes per second in the GPU span (the longest actor span: its first engine call's start to its last one's end,
start-up excluded), each actor's tiles, engine seconds, engine-busy and GPU-busy fractions in its own span (see
trtseg/jobs/timeline.py), and the partial sums shipped per case.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile

from benchmarks.case_latency import make_fullres_model
from benchmarks.common import machine, save
from trtseg.jobs.config import JobConfig
from trtseg.jobs.driver import run_job
from trtseg import synthetic as syn
from trtseg.options import EngineSpec, Settings, WindowOptions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--actors", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--shape", nargs=3, type=int, default=[512, 512, 240])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="trtseg_scaling_")
    model = make_fullres_model(os.path.join(work, "model"))
    os.makedirs(os.path.join(work, "in"))
    x, y, z = args.shape
    for i in range(args.cases):
        dest = os.path.join(work, "in", f"ct{i:03d}_0000.nii.gz")
        if i < 2:
            syn.save_nifti(dest, syn.ct_like_volume((x, y, z - 8 * i), seed=200 + i), syn.affine_for((0.7, 0.7, 1.25)))
        else:
            shutil.copyfile(os.path.join(work, "in", f"ct{i % 2:03d}_0000.nii.gz"), dest)
    out = {"scenario": "scaling", "machine": machine(), "cases": args.cases, "shape_xyz": args.shape, "runs": []}
    for n in args.actors:
        cfg = JobConfig(input=os.path.join(work, "in"), output=os.path.join(work, f"out{n}"), model=model,
                        settings=Settings(window=WindowOptions(use_mirroring=False),
                                          engine=EngineSpec("torch", "cuda", batch_size=4)),
                        gpus_per_actor=round(0.8 / n, 3), task_gpus=0.1, tiles_per_task=16, progress=False)
        r = run_job(cfg)
        ok = [c for c in r["cases"] if c["status"] == "ok"]
        span = max(a["engine_span_seconds"] or 0 for a in r["actors"])
        out["runs"].append({
            "actors": n, "gpus_per_actor": cfg.gpus_per_actor, "wall_seconds": r["summary"]["wall_seconds"],
            "ok": len(ok), "gpu_span_seconds": span,
            "volumes_per_s_in_span": round(len(ok) / span, 4) if span else None,
            "tiles_per_actor": {a["actor"]: a["tiles"] for a in r["actors"]},
            "engine_seconds": {a["actor"]: a["engine_seconds"] for a in r["actors"]},
            "engine_busy_in_span": {a["actor"]: a["engine_busy_in_span"] for a in r["actors"]},
            "gpu_busy_in_span": {a["actor"]: a.get("gpu_busy_in_span") for a in r["actors"]},
            "warmup_seconds": {a["actor"]: a["warmup_seconds"] for a in r["actors"]},
            "median_partials_mb_per_case": round(statistics.median(c["object_store_bytes"]["partials"] for c in ok) / 2 ** 20, 1),
            "volumes_spread_over_several_actors": sum(len(c["actors"]) > 1 for c in ok)})
        print(out["runs"][-1], flush=True)
        save(out, args.json)  # after every run: a run cut short still leaves the ones before it


if __name__ == "__main__":
    main()
