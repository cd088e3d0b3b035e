"""Where a one-CT `trtseg predict` process's wall time goes, from its start to its exit:

    python -m benchmarks.startup_profile [--shape 512 512 240] [--flags=--no-fuse-norms] [--json F]

Each run is a whole process (default flags, no mirroring, as benchmarks/predict_vs_nnunet.py): its log lines are
stamped as they arrive, relative to the process's start, so that the time before the first line (interpreter and
imports), between the lines (model and engine load, warm-up, the case) and after the last one (the process's exit)
is seen beside the run report's own stages. Runs: the first with an empty engine cache (cold), then warm, then
warm with TORCHINDUCTOR_COMPILE_THREADS=1 (no Inductor compile-worker pool: with the compile cache loaded there is
nothing left for the pool to compile). `python -c "import trtseg.cli"` times the imports alone.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks.case_latency import make_fullres_model
from benchmarks.common import machine, save, write_ct


def _timed(cmd: list[str], env: dict) -> dict:
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    assert p.stderr is not None
    for line in p.stderr:
        lines.append((round(time.perf_counter() - t0, 2), line.strip()[:160]))
    rc = p.wait()
    return {"seconds": round(time.perf_counter() - t0, 2), "exit": rc, "lines": lines}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", nargs=3, type=int, default=[512, 512, 240])
    ap.add_argument("--json", default=None)
    ap.add_argument("--flags", default="", help="more trtseg predict flags, one string (e.g. '--no-fuse-norms')")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="trtseg_startup_")
    model = make_fullres_model(os.path.join(work, "m"))
    os.makedirs(os.path.join(work, "in"))
    write_ct(os.path.join(work, "in", "ct000_0000.nii.gz"), args.shape)
    env = {**os.environ, "TRTSEG_CACHE": os.environ.get("TRTSEG_CACHE") or os.path.join(work, "cache")}
    out: dict = {"scenario": "startup_profile", "machine": machine(), "shape_xyz": args.shape, "flags": args.flags,
                 "runs": {}}
    out["imports"] = _timed([sys.executable, "-c", "import trtseg.cli"], env)
    for name, extra_env in (("cold", {}), ("warm", {}), ("warm_compile_threads_1",
                                                         {"TORCHINDUCTOR_COMPILE_THREADS": "1"})):
        dest = os.path.join(work, name)
        run = _timed([sys.executable, "-m", "trtseg.cli", "predict", "-i", os.path.join(work, "in"), "-o", dest,
                      "-m", model, "--disable-tta", "--no-progress", *args.flags.split()], {**env, **extra_env})
        if run["exit"] == 0:
            rep = json.load(open(os.path.join(dest, "run_report.json")))
            run["report"] = {"startup_seconds": rep["summary"].get("startup_seconds"),
                             "wall_seconds": rep["summary"].get("wall_seconds"),
                             "case_seconds": rep["cases"][0].get("seconds"),
                             "compile_cache": (rep.get("engine") or {}).get("compile_cache")}
            run["after_last_line"] = round(run["seconds"] - run["lines"][-1][0], 2) if run["lines"] else None
        out["runs"][name] = run
        save(out, args.json)


if __name__ == "__main__":
    main()
