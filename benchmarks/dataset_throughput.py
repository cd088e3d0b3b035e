"""Dataset throughput: N CT-sized volumes through the Ray job (`trtseg predict`), one machine.

    python -m benchmarks.dataset_throughput [--cases 8] [--shape 512 512 240] [--json results.json] [job options]

Volumes are CT-like (air, body, organs, bone, noise): four distinct ones with slightly different sizes, copied to
make --cases; the model is 3d_fullres
32->320 at 128^3. The job starts a local Ray. Reported: volumes/s (and per GPU), each actor's engine-busy
fraction (time inside the engine, synchronized, over the job's wall time), median per-stage seconds, object-store
bytes per case, peak RSS of the workers and peak GPU memory of the actors. The first volumes include the actors'
start-up (engine creation, warm-up: compile and cuDNN autotuning): that is part of a job's real cost, and is
stated, with each actor's warm-up seconds. Three engine-busy fractions:
- over the job's wall time (start-up included);
- since the first tile: an actor's engine time over the time from its first tile to the end of the job;
- in span: engine time over the GPU's own clock from the first engine call's start to the last one's end (CUDA
  events), which leaves out start-up and the last case's export and write.
gpu_busy_in_span: the share of that span in which any of the actor's GPU work ran (tile gathers, engine,
accumulation, exports; trtseg/jobs/timeline.py); case_gap_seconds splits the engine's idle time at case starts.
gpu_utilization_nvml: NVML's utilization of GPU 0 (share of time any kernel ran: engine, accumulation, export),
sampled by nvidia-smi every 100 ms and averaged over the job, from the first tile to the end, over the actor's
engine span (its first tile's wall time plus the span), and over that span less its first and last second (NVML
averages over a window of up to a second, which at the span's ends takes in idle time outside it).
volumes_per_gpu_hour_in_span: the volumes over the longest actor span, the rate once start-up is over (with one GPU;
with several it is per GPU only when each actor has a whole GPU).
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor

from benchmarks.case_latency import make_fullres_model
from benchmarks.common import machine, save
from trtseg.jobs.config import JobConfig
from trtseg.jobs.driver import run_job
from trtseg import synthetic as syn
from trtseg.options import EngineSpec, OutputOptions, Settings, WindowOptions, add_options, from_args

JOB_FLAGS = ("gpus_per_actor", "task_gpus", "tiles_per_task", "max_cases_in_flight", "partials", "diagnostics")


class NvmlSampler:
    """GPU 0's NVML utilization (the share of time one or more kernels ran, any kernel: engine, accumulation,
    export) every 100 ms, from nvidia-smi, with the wall time of each sample."""

    def __init__(self):
        self.samples: list[tuple[float, float]] = []
        self.proc: subprocess.Popen[str] | None
        try:
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                          "-i", "0", "-lms", "100"], stdout=subprocess.PIPE, text=True)
        except OSError:
            self.proc = None
            return
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip().isdigit():
                self.samples.append((time.time(), float(line)))

    def mean(self, start: float, end: float) -> float | None:
        inside = [u for t, u in self.samples if start <= t <= end]
        return round(sum(inside) / len(inside) / 100, 4) if inside else None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()


def _write_volume(dest: str, shape_xyz, seed: int) -> None:
    syn.save_nifti(dest, syn.ct_like_volume(shape_xyz, seed=seed), syn.affine_for((0.7, 0.7, 1.25)))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--shape", nargs=3, type=int, default=[512, 512, 240])
    ap.add_argument("--mirroring", action="store_true")
    # the same flags as trtseg predict, with this scenario's defaults
    add_options(ap, EngineSpec, defaults=EngineSpec("torch", "cuda", batch_size=4))
    add_options(ap, OutputOptions)
    add_options(ap, JobConfig, only=JOB_FLAGS, defaults=JobConfig(input="", output="", gpus_per_actor=0.8,
                                                                  task_gpus=0.1, tiles_per_task=16))
    ap.add_argument("--json", default=None)
    return ap


def main() -> None:
    args = parser().parse_args()
    work = tempfile.mkdtemp(prefix="trtseg_dataset_")
    model = make_fullres_model(os.path.join(work, "model"))
    os.makedirs(os.path.join(work, "in"))
    t = time.perf_counter()
    x, y, z = args.shape
    dests = [os.path.join(work, "in", f"ct{i:03d}_0000.nii.gz") for i in range(args.cases)]
    with ProcessPoolExecutor(4) as pool:  # four distinct volumes (sizes differ by 8 slices), copied to fill --cases
        list(pool.map(_write_volume, dests[:4], [(x, y, z - 8 * i) for i in range(4)], range(100, 104)))
    for i in range(4, args.cases):
        shutil.copyfile(dests[i % 4], dests[i])
    gen_s = time.perf_counter() - t
    cfg = JobConfig(input=os.path.join(work, "in"), output=os.path.join(work, "out"), model=model,
                    settings=Settings(window=WindowOptions(use_mirroring=args.mirroring),
                                      engine=from_args(EngineSpec, args), output=from_args(OutputOptions, args)),
                    progress=False, **{f: getattr(args, f) for f in JOB_FLAGS})
    sampler = NvmlSampler()
    t_job = time.time()
    report = run_job(cfg)
    t_end = time.time()
    sampler.stop()
    first_tile = min((a["first_tile_at"] for a in report["actors"] if a.get("first_tile_at")), default=None)
    span_end = max((a["first_tile_at"] + a["engine_span_seconds"] for a in report["actors"]
                    if a.get("first_tile_at") and a.get("engine_span_seconds")), default=None)
    longest_span = max((a["engine_span_seconds"] or 0 for a in report["actors"]), default=0)
    ok = [c for c in report["cases"] if c["status"] == "ok"]
    wall = report["summary"]["wall_seconds"]
    n_gpu_actors = report["job"]["actors"]
    stages = sorted({k for c in ok for k in c["seconds"]})
    done = sorted(ok, key=lambda c: c["done_at_s"])
    out = {"scenario": "dataset_throughput", "machine": machine(), "cases": args.cases, "shape_xyz": args.shape,
           "generate_inputs_seconds": round(gen_s, 1), "job": report["job"], "wall_seconds": wall,
           "volumes_per_s": round(len(ok) / wall, 4), "volumes_per_gpu_hour": round(3600 * len(ok) / wall / max(1, math.ceil(n_gpu_actors * args.gpus_per_actor)), 1),
           "engine_busy_fraction": report["summary"]["engine_busy_fraction"],
           "engine_busy_since_first_tile": {a["actor"]: a["engine_busy_since_first_tile"] for a in report["actors"]},
           "engine_busy_in_span": {a["actor"]: a["engine_busy_in_span"] for a in report["actors"]},
           "gpu_busy_in_span": {a["actor"]: a.get("gpu_busy_in_span") for a in report["actors"]},
           "tile_work_in_span": {a["actor"]: a.get("tile_work_in_span") for a in report["actors"]},
           "warmup_seconds": {a["actor"]: a["warmup_seconds"] for a in report["actors"]},
           "engine_gap_seconds": {a["actor"]: a["engine_gap_seconds"] for a in report["actors"]},
           "case_gap_seconds": {a["actor"]: a.get("case_gap_seconds") for a in report["actors"]},
           "case_start_host_seconds": {a["actor"]: a.get("case_start_host_seconds") for a in report["actors"]},
           "cuda_allocator": {a["actor"]: a.get("cuda_allocator") for a in report["actors"]},
           "first_mask_after_seconds": done[0]["done_at_s"] if done else None,
           "engine_span_seconds": {a["actor"]: a["engine_span_seconds"] for a in report["actors"]},
           "gpu_utilization_nvml": {"job": sampler.mean(t_job, t_end),
                                    "first_tile_to_end": sampler.mean(first_tile, t_end) if first_tile else None,
                                    "engine_span": sampler.mean(first_tile, span_end) if first_tile and span_end else None,
                                    # NVML averages over its own window (up to a second): the span's first and last
                                    # second mix in the idle time just outside it
                                    "engine_span_inner": sampler.mean(first_tile + 1, span_end - 1)
                                    if first_tile and span_end and span_end - first_tile > 4 else None,
                                    "samples": len(sampler.samples)},
           "volumes_per_gpu_hour_in_span": round(3600 * len(ok) / longest_span, 1) if longest_span > 0 else None,
           "median_stage_seconds": {k: round(statistics.median(c["seconds"].get(k, 0) for c in ok), 3) for k in stages},
           "median_object_store_mb_per_case": {k: round(statistics.median(c["object_store_bytes"][k] for c in ok) / 2 ** 20, 1)
                                               for k in ("volume", "partials", "mask")},
           "peak_rss_mb": {"actors": [a["peak_rss_mb"] for a in report["actors"]],
                           "prepare_workers": max(c["peak_rss_mb"]["prepare_worker"] or 0 for c in ok),
                           "write_workers": max(c["peak_rss_mb"]["write_worker"] or 0 for c in ok)},
           "peak_gpu_memory_mb_actors": [a["peak_gpu_memory_mb"] for a in report["actors"]],
           "peak_gpu_memory_mb_per_case": {"median": statistics.median(c.get("peak_gpu_memory_mb") or 0 for c in ok),
                                           "max": max(c.get("peak_gpu_memory_mb") or 0 for c in ok)} if ok else None,
           "failed": [c for c in report["cases"] if c["status"] == "failed"],
           "note": "wall time includes Ray start-up and actor start-up (engine creation)",
           **({"trace": {a["actor"]: a["trace"] for a in report["actors"]}}
              if any("trace" in a for a in report["actors"]) else {})}
    save(out, args.json)


if __name__ == "__main__":
    main()
