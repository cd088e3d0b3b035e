"""Where a one-CT `trtseg predict` process's wall time goes, from its start to its exit:

    python -m benchmarks.startup_profile [--shape 512 512 240] [--cases 1] [--flags=--no-fuse-norms] [--profile]
        [--env KEY=VALUE ...] [--no-threads-run] [--json F]

Each run is a whole process (default flags, no mirroring, as benchmarks/predict_vs_nnunet.py): its log lines are
stamped as they arrive, relative to the process's start, so that the time before the first line (interpreter and
imports), between the lines (model and engine load, warm-up, the case) and after the last one (the process's exit)
is seen beside the run report's own stages. Runs: the first with an empty engine cache (cold), then warm, then warm
with TORCHINDUCTOR_COMPILE_THREADS=1 (no Inductor compile-worker pool: with the compile cache loaded there is
nothing left for the pool to compile). `python -c "import trtseg.cli"` times the imports alone,
`import trtseg.jobs.driver` those a run makes (torch, nibabel, the stages). With --cases N the input holds N
copies of the CT (one file written, the rest linked). With --profile one more warm run goes under cProfile (its
main thread: the engines, the case loop, the exit), and its 40 costliest calls by cumulative and by own time are
kept as text. Each --env KEY=VALUE adds a warm run with that variable set, then another warm run without it (A, B,
A: e.g. TRTSEG_PREPARE_AHEAD=0 against the default on one machine); --no-threads-run skips the
TORCHINDUCTOR_COMPILE_THREADS=1 run.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pstats
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
    ap.add_argument("--cases", type=int, default=1, help="copies of the CT in the input folder")
    ap.add_argument("--profile", action="store_true", help="one more warm run under cProfile")
    ap.add_argument("--env", nargs="*", default=[], help="KEY=VALUE: a warm run with it set, then one without")
    ap.add_argument("--no-threads-run", action="store_true", help="no TORCHINDUCTOR_COMPILE_THREADS=1 run")
    ap.add_argument("--json", default=None)
    ap.add_argument("--flags", default="", help="more trtseg predict flags, one string (e.g. '--no-fuse-norms')")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="trtseg_startup_")
    model = make_fullres_model(os.path.join(work, "m"))
    os.makedirs(os.path.join(work, "in"))
    first = os.path.join(work, "in", "ct000_0000.nii.gz")
    write_ct(first, args.shape)
    for i in range(1, args.cases):  # the same bytes under other case names: the run reads and writes each
        os.link(first, os.path.join(work, "in", f"ct{i:03d}_0000.nii.gz"))
    env = {**os.environ, "TRTSEG_CACHE": os.environ.get("TRTSEG_CACHE") or os.path.join(work, "cache")}
    out: dict = {"scenario": "startup_profile", "machine": machine(), "shape_xyz": args.shape, "flags": args.flags,
                 "cases": args.cases, "runs": {}}
    out["imports"] = _timed([sys.executable, "-c", "import trtseg.cli"], env)
    out["imports_of_a_run"] = _timed([sys.executable, "-c", "import trtseg.jobs.driver"], env)
    prof = os.path.join(work, "warm.prof")
    steps = [("cold", {}, []), ("warm", {}, [])]
    if not args.no_threads_run:
        steps.append(("warm_compile_threads_1", {"TORCHINDUCTOR_COMPILE_THREADS": "1"}, []))
    for i, pair in enumerate(args.env):
        key, _, value = pair.partition("=")
        steps += [(f"warm_{key}={value}", {key: value}, []), (f"warm_again_{i}", {}, [])]
    if args.profile:
        steps.append(("warm_cprofile", {}, ["-m", "cProfile", "-o", prof]))
    for name, extra_env, runner in steps:
        dest = os.path.join(work, name)
        run = _timed([sys.executable, *runner, "-m", "trtseg.cli", "predict", "-i", os.path.join(work, "in"),
                      "-o", dest, "-m", model, "--disable-tta", "--no-progress", *args.flags.split()],
                     {**env, **extra_env})
        if run["exit"] == 0:
            rep = json.load(open(os.path.join(dest, "run_report.json")))
            run["report"] = {"startup_seconds": rep["summary"].get("startup_seconds"),
                             "wall_seconds": rep["summary"].get("wall_seconds"),
                             "case_seconds": rep["cases"][0].get("seconds"),
                             "compile_cache": (rep.get("engine") or {}).get("compile_cache")}
            run["after_last_line"] = round(run["seconds"] - run["lines"][-1][0], 2) if run["lines"] else None
        if runner and os.path.exists(prof):
            for key in ("cumulative", "tottime"):
                text = io.StringIO()
                pstats.Stats(prof, stream=text).sort_stats(key).print_stats(40)
                run[f"top_by_{key}"] = text.getvalue().splitlines()
        out["runs"][name] = run
        save(out, args.json)


if __name__ == "__main__":
    main()
