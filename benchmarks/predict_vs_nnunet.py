"""`trtseg predict` as a user runs it, default flags, against `nnUNetv2_predict` on the same volumes and GPU:

    python -m benchmarks.predict_vs_nnunet [--cases 16 64] [--nnunet-cases 1 16] [--mirrored-cases 1]
        [--nnunet-timeout S] [--no-one-ct] [--shape 512 512 240] [--json F] [--ray-from-cases N] [--skip-nnunet]
        [--trtseg-flags=--compiled-package ...]

Each step is one whole process, timed from its start to its exit: imports, model load, engine build or cache load,
the fast path's check, warm-up, every case's read, inference, export and write.

1. `trtseg predict -i ONE_CT` with an empty engine cache (cold: the fast path's fp32 check runs; one case runs
   without compile and fused norms, see --compile-from);
2. `trtseg predict` on the first count of --cases with no compiled code in the cache yet (its check and compile
   run), then on each count of --cases, warm (verdict and compiled code loaded); --cases may be empty;
3. the one CT again, into another output folder, with the cache the runs before left (warm: the verdict loaded,
   and the compiled parts where a small run keeps them, see trtseg.predict.small_run_settings);
4. `trtseg predict --no-fast --precision fp32` on the first CT: the reference the default's masks are compared with;
5. with --mirrored-cases M: `trtseg predict` and `nnUNetv2_predict` on M CTs with mirroring, both sides' default
   (trtseg twice when no step before compiled: first compiling, then warm);
6. `nnUNetv2_predict -d ... -c 3d_fullres -f 0` on each count of --nnunet-cases (its default workers), beside
   the warm trtseg run of the same count (run for it if no earlier step had that count).

Every other run is without mirroring (--disable-tta / --disable_tta). With two counts on a side, the seconds one
more case adds in one process (the steady state) are the difference of the two runs over the difference of counts.
nnUNetv2's masks are timed as they appear in its output folder: from the second to the last, the seconds per case of
a running process, also for a run --nnunet-timeout cuts off (then a lower bound on its whole time). Model: nnU-Net's
3d_fullres CT topology (PlainConvUNet 32->320, 6 stages, 128^3 patch), seeded random weights; inputs: CT-like
512x512x240 volumes at 0.7 x 0.7 x 1.25 mm, four distinct ones copied to fill a count. Reported: each step's
seconds, the run report's start-up and per-case seconds, what the fast path chose and where from, the compile
cache's status, volumes per GPU-hour, and voxel agreement of the default's masks with fp32's and nnUNetv2's. Results
are written after each step, so a run cut short keeps what it measured. --trtseg-flags: flags added to every
trtseg run but the fp32 reference (an option under test, such as --compiled-package; the default is none).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import nibabel as nib
import numpy as np
import torch

from benchmarks.case_latency import make_fullres_model
from benchmarks.common import machine, save, write_ct


def _inputs(work: str, counts: list[int], shape) -> dict[int, str]:
    """A folder per count, of CTs ct000..; four distinct volumes, hard-linked (or copied) to fill each."""
    top = os.path.join(work, "volumes")
    os.makedirs(top)
    srcs = [os.path.join(top, f"v{i}.nii.gz") for i in range(4)]
    x, y, z = shape
    with ProcessPoolExecutor(4) as pool:
        list(pool.map(write_ct, srcs, [(x, y, z - 8 * i) for i in range(4)], range(100, 104)))
    folders = {}
    for n in sorted(set(counts)):
        folder = os.path.join(work, f"in{n}")
        os.makedirs(folder)
        for i in range(n):
            dest = os.path.join(folder, f"ct{i:03d}_0000.nii.gz")
            try:
                os.link(srcs[i % 4], dest)
            except OSError:
                shutil.copyfile(srcs[i % 4], dest)
        folders[n] = folder
    return folders


def _agreement(a_dir: str, b_dir: str, cases: list[str]) -> dict[str, float]:
    out = {}
    for c in cases:
        a = np.asarray(nib.load(os.path.join(a_dir, c + ".nii.gz")).dataobj)
        b = np.asarray(nib.load(os.path.join(b_dir, c + ".nii.gz")).dataobj)
        out[c] = round(float((a == b).mean()), 6)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, nargs="*", default=[16, 64], help="warm runs over this many CTs")
    ap.add_argument("--nnunet-cases", type=int, nargs="*", default=[2], help="nnUNetv2_predict runs over these counts")
    ap.add_argument("--mirrored-cases", type=int, default=0,
                    help="also run this many CTs with mirroring (nnU-Net's default), on both sides")
    ap.add_argument("--nnunet-timeout", type=float, default=None,
                    help="cut an nnUNetv2 run off after this many seconds (recorded as a lower bound)")
    ap.add_argument("--no-one-ct", action="store_true", help="skip the one-CT cold, warm and fp32 steps")
    ap.add_argument("--shape", nargs=3, type=int, default=[512, 512, 240])
    ap.add_argument("--ray-from-cases", default=None, help="passed to trtseg predict (default: its own)")
    ap.add_argument("--skip-nnunet", action="store_true")
    ap.add_argument("--trtseg-flags", nargs="*", default=[], help="added to every trtseg run but the fp32 reference "
                    "(pass as --trtseg-flags=--FLAG)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="trtseg_predict_")
    results = os.path.join(work, "results")
    t = time.perf_counter()
    model = make_fullres_model(os.path.join(results, "Dataset089_CT", "nnUNetTrainer__nnUNetPlans__3d_fullres"))
    nn_counts = [] if args.skip_nnunet else list(args.nnunet_cases)
    inputs = _inputs(work, [1, *nn_counts, *args.cases, *([args.mirrored_cases] if args.mirrored_cases else [])],
                     args.shape)
    out: dict = {"scenario": "predict_vs_nnunet", "machine": machine(), "shape_xyz": args.shape,
                 "mirroring": "off unless a run's name says mirroring",
                 "setup_seconds": round(time.perf_counter() - t, 1),
                 "trtseg_command": " ".join(["trtseg predict -i IN -o OUT -m MODEL --disable-tta --no-progress",
                                             *args.trtseg_flags]),
                 "nnunetv2_command": "nnUNetv2_predict -i IN -o OUT -d 89 -c 3d_fullres -f 0 --disable_tta",
                 "runs": {}, "nnunetv2_runs": {}}
    env = {**os.environ, "TRTSEG_CACHE": os.environ.get("TRTSEG_CACHE") or os.path.join(work, "cache"),
           "nnUNet_results": results, "nnUNet_raw": work, "nnUNet_preprocessed": work}
    extra = ["--ray-from-cases", args.ray_from_cases] if args.ray_from_cases is not None else []

    def trtseg(name: str, n: int, *flags: str, tta: bool = False) -> None:
        dest = os.path.join(work, name)
        flags = flags or tuple(args.trtseg_flags)
        cmd = [sys.executable, "-m", "trtseg.cli", "predict", "-i", inputs[n], "-o", dest, "-m", model,
               *([] if tta else ["--disable-tta"]), "--no-progress", *extra, *flags]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        seconds = round(time.perf_counter() - t0, 2)
        entry: dict = {"cases": n, "seconds": seconds, "flags": list(flags), "mirroring": tta, "exit": r.returncode}
        if r.returncode == 0:
            rep = json.load(open(os.path.join(dest, "run_report.json")))
            summary, engine = rep["summary"], rep.get("engine") or {}
            entry.update(
                ok=summary.get("ok"), mode=rep["job"].get("mode"), small_run=rep["job"].get("small_run"),
                startup_seconds=summary.get("startup_seconds"), volumes_per_gpu_hour=round(3600 * n / seconds, 1),
                case_seconds=[c.get("seconds") for c in rep["cases"]][:4],
                engine={k: engine.get(k) for k in ("engine", "precision", "compiled", "channels_last", "fp16_weights",
                                                   "folded_convolutions", "merged_upsamplings", "fused_norms",
                                                   "compile_cache", "package", "fast_path")})
        else:
            entry["error"] = (r.stdout + r.stderr)[-3000:]
        out["runs"][name] = entry
        _save(out, args.json)

    def nnunet(name: str, n: int, trtseg_run: str, tta: bool = False) -> None:
        dest = os.path.join(work, "nn_" + name)
        cmd = [sys.executable, "-c", "import sys; from nnunetv2.inference.predict_from_raw_data import "
               "predict_entry_point; sys.argv[0] = 'nnUNetv2_predict'; predict_entry_point()",
               "-i", inputs[n], "-o", dest, "-d", "89", "-c", "3d_fullres", "-f", "0",
               *([] if tta else ["--disable_tta"]), *([] if torch.cuda.is_available() else ["-device", "cpu"])]
        t0 = time.perf_counter()
        # its own process group: a run cut off takes its preprocessing and export workers with it
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        # its output read in a thread; the main thread notes when each mask appears (the per-case pace of a run
        # that the timeout cuts off)
        with ThreadPoolExecutor(1) as pool:
            text_future = pool.submit(lambda: proc.stdout.read() if proc.stdout else "")
            seen = _watch_masks(proc, dest, t0, args.nnunet_timeout)
            cut = proc.poll() is None
            if cut:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            text = text_future.result()
        if not cut:
            entry: dict = {"cases": n, "mirroring": tta, "seconds": round(time.perf_counter() - t0, 2),
                           "exit": proc.returncode}
            if proc.returncode:
                entry["error"] = text[-3000:]
        else:
            entry = {"cases": n, "mirroring": tta, "seconds_at_least": round(time.perf_counter() - t0, 2),
                     "cut_off": f"--nnunet-timeout {args.nnunet_timeout}: {len(seen)} of {n} masks written"}
        entry["mask_seen_seconds"] = sorted(seen.values())
        pace = _pace(entry["mask_seen_seconds"])
        if pace is not None:
            entry["seconds_per_case_between_masks"] = pace
        ours = out["runs"].get(trtseg_run, {})
        if entry.get("exit") == 0 and ours.get("exit") == 0:
            cases = [f"ct{i:03d}" for i in range(min(n, 4))]
            entry["agreement_trtseg_vs_nnunetv2"] = _agreement(os.path.join(work, trtseg_run), dest, cases)
            entry["trtseg_run"], entry["speedup"] = trtseg_run, round(entry["seconds"] / ours["seconds"], 1)
        elif "seconds_at_least" in entry and ours.get("exit") == 0:
            entry["trtseg_run"] = trtseg_run
            entry["speedup_at_least"] = round(entry["seconds_at_least"] / ours["seconds"], 1)
        out["nnunetv2_runs"][name] = entry
        _save(out, args.json)

    if not args.no_one_ct:
        trtseg("one_ct_cold_cache", 1)
    if args.cases:
        trtseg(f"cts{args.cases[0]}_first_compile", args.cases[0])
    for n in args.cases:
        trtseg(f"cts{n}_warm_cache", n)
    if args.mirrored_cases:
        if not args.cases:  # no compiled code cached yet: this run compiles, the next one loads it
            trtseg(f"cts{args.mirrored_cases}_mirroring_first_compile", args.mirrored_cases, tta=True)
        trtseg(f"cts{args.mirrored_cases}_mirroring_warm_cache", args.mirrored_cases, tta=True)
    if not args.no_one_ct:
        trtseg("one_ct_warm_cache", 1)
        trtseg("one_ct_fp32_reference", 1, "--no-fast", "--precision", "fp32")
        if all(out["runs"][k]["exit"] == 0 for k in ("one_ct_warm_cache", "one_ct_fp32_reference")):
            out["agreement_default_vs_fp32"] = _agreement(os.path.join(work, "one_ct_warm_cache"),
                                                          os.path.join(work, "one_ct_fp32_reference"), ["ct000"])
            _save(out, args.json)
    if args.mirrored_cases and not args.skip_nnunet:
        m = args.mirrored_cases
        nnunet(f"cts{m}_mirroring", m, f"cts{m}_mirroring_warm_cache", tta=True)
    for n in nn_counts:
        mine = "one_ct_warm_cache" if n == 1 and not args.no_one_ct else f"cts{n}_warm_cache"
        if mine not in out["runs"]:  # the count nnU-Net runs is not a trtseg step of its own: run it, warm
            trtseg(mine, n)
        nnunet(f"cts{n}", n, mine)
    # the cost of one more case in a running process, start-up excluded: each side's runs without mirroring
    trtseg_steady = _steady([r for k, r in out["runs"].items() if k.endswith("_warm_cache")])
    nnunet_steady = _steady(list(out["nnunetv2_runs"].values()))
    if trtseg_steady is not None:
        out["trtseg_seconds_per_case_steady"] = trtseg_steady
    if nnunet_steady is not None:
        out["nnunetv2_seconds_per_case_steady"] = nnunet_steady
    paces = [r for r in out["nnunetv2_runs"].values()
             if r.get("seconds_per_case_between_masks") and not r["mirroring"]]
    if paces:  # the same steady state from one run's mask times (the only one where a run was cut off)
        out["nnunetv2_seconds_per_case_between_masks"] = max(paces, key=lambda r: r["cases"])[
            "seconds_per_case_between_masks"]
    _save(out, args.json)


def _watch_masks(proc: subprocess.Popen, dest: str, t0: float, timeout: float | None) -> dict[str, float]:
    """Seconds from ``t0`` at which each mask file first appeared in ``dest`` (polled every 0.2 s), until ``proc``
    exits or ``timeout`` seconds have passed."""
    seen: dict[str, float] = {}

    def look() -> None:
        for f in os.listdir(dest) if os.path.isdir(dest) else []:
            if f.endswith(".nii.gz") and f not in seen:
                seen[f] = round(time.perf_counter() - t0, 2)

    while proc.poll() is None and (timeout is None or time.perf_counter() - t0 < timeout):
        look()
        time.sleep(0.2)
    if proc.poll() is not None:  # those written in its last moments
        look()
    return seen


def _pace(seen: list[float]) -> float | None:
    """Seconds per case in a running process from the times its masks appeared: the second to the last over the
    cases between them (the first mask's time holds the start-up); None with fewer than three masks."""
    if len(seen) < 3:
        return None
    return round((seen[-1] - seen[1]) / (len(seen) - 2), 2)


def _steady(runs: list[dict]) -> float | None:
    """Seconds one more case adds: the difference of the largest and smallest count's whole-process seconds over the
    difference of counts, among ``runs`` without mirroring that finished; None with fewer than two counts."""
    done = sorted((r["cases"], r["seconds"]) for r in runs if not r["mirroring"] and r.get("exit") == 0)
    if len(done) < 2 or done[0][0] == done[-1][0]:
        return None
    (n0, s0), (n1, s1) = done[0], done[-1]
    return round((s1 - s0) / (n1 - n0), 3)


def _save(out: dict, path: str | None) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(out, f, indent=2)
    else:
        save(out, None)


if __name__ == "__main__":
    main()
