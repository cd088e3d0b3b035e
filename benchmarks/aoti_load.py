"""Whether an AOTInductor package would spare the compiled path's start-up (an experiment, not a product path):

    python -m benchmarks.aoti_load [--configs fast fast_unfused plain] [--batch 4] [--small] [--json F]

A warm `trtseg predict` with compiled code spends seconds before its first case importing TorchDynamo and
Inductor, tracing the network and loading Inductor's caches (docs/performance.md). AOTInductor compiles an
exported network ahead of time into a package that a process loads without tracing. For each configuration, on
the network trtseg's engine builds (TorchEngine with the same parts, batch --batch, the model's patch):

1. one process exports it (torch.export) and compiles the package (torch._inductor.aoti_compile_and_package);
2. a fresh process loads the package and runs one batch, timed from its main function's start (after the
   interpreter's own start): torch's import, the load, the first call; then the median of 5 more batches. Twice:
   through torch._inductor.aoti_load_package ("load"), and through the C++ loader it wraps
   (torch._C._aoti.AOTIModelPackageLoader, "load_cpp"), which spares importing Inductor's Python modules (2.4 s
   on a 2-core CPU);
3. the package's logits against the engine's own (eager) logits on the same batch: max abs difference and argmax
   agreement.

Configurations: "fast" (CUDA: fp16 weights, channels-last, folded convolutions, merged upsampling, fused norms:
what the compiled default runs; the loading process registers the fused norms' custom ops, which the package calls
back), "fast_unfused" (the same without the fused norms) and "plain" (fp16 weights only; on the CPU every configuration is fp32). A
step that fails is recorded with its one-line error. Model: nnU-Net's 3d_fullres CT topology (32->320, 128^3
patch) with seeded random weights; --small: 8->64 features at 32x48x48, for a CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

# each step is a fresh process running this module with --step; its last stdout line is its JSON
PARTS = {"fast": dict(fp16_weights=True, channels_last=True, fold_convolutions=True, merge_upsampling=True,
                      fuse_norms=True),
         "fast_unfused": dict(fp16_weights=True, channels_last=True, fold_convolutions=True, merge_upsampling=True),
         "plain": dict(fp16_weights=True)}


def _engine(folder: str, config: str, device: str):
    from trtseg.accel.torch_engine import TorchEngine
    from trtseg.model_folder import load_model_folder

    model = load_model_folder(folder, ["0"])
    parts = PARTS[config] if device == "cuda" else {}
    engine = TorchEngine(model.build_network("0"), device, "fp16" if device == "cuda" else "fp32", **parts)
    return model, engine


def _batch(model, batch: int, device: str):
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn((batch, model.num_input_channels, *model.patch_size), generator=g)
    return x.to(device)


def step_export(folder: str, config: str, batch: int, device: str, package: str) -> dict:
    import torch

    model, engine = _engine(folder, config, device)
    x = engine._prepare(_batch(model, batch, device))  # the dtype and memory order the network takes
    t = time.perf_counter()
    with torch.inference_mode():
        exported = torch.export.export(engine.network, (x,))
    seconds_export = time.perf_counter() - t
    t = time.perf_counter()
    torch._inductor.aoti_compile_and_package(exported, package_path=package)
    with torch.inference_mode():
        reference = engine.network(x).float().cpu()
    torch.save({"input": x.cpu(), "logits": reference}, package + ".check.pt")
    return {"export_seconds": round(seconds_export, 2), "compile_seconds": round(time.perf_counter() - t, 2),
            "package_bytes": os.path.getsize(package)}


def step_load(package: str, device: str, t_process: float, loader: str, config: str) -> dict:
    import statistics

    import torch
    if PARTS[config].get("fuse_norms") and device == "cuda":
        # the fused norms are custom ops the package calls back: registered by importing the rewrite, as the engine
        # does before it loads a package
        import trtseg.accel.rewrites.norm_fusion  # noqa: F401
    t_imported = time.perf_counter()
    check = torch.load(package + ".check.pt")
    x = check["input"].to(device)  # the engine's own input: its dtype and memory order kept
    t = time.perf_counter()
    if loader == "python":
        runner = torch._inductor.aoti_load_package(package)
    else:  # the C++ loader that aoti_load_package wraps, without importing Inductor's Python modules
        cpp = torch._C._aoti.AOTIModelPackageLoader(package, "model", False, 1, -1)

        def runner(batch):
            return cpp.run([batch])
    t_loaded = time.perf_counter()

    def call():
        result = runner(x)
        if device == "cuda":
            torch.cuda.synchronize()
        return result

    with torch.inference_mode():
        out = call()
        t_first = time.perf_counter()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
    out = (out[0] if isinstance(out, (list, tuple)) else out).float().cpu()
    reference = check["logits"]
    return {"seconds_to_torch_imported": round(t_imported - t_process, 2),
            "load_seconds": round(t_loaded - t, 2), "first_batch_seconds": round(t_first - t_loaded, 2),
            "seconds_from_main_to_first_logits": round(t_first - t_process, 2),
            "batch_seconds_median": round(statistics.median(times), 4),
            "max_abs_vs_engine": round(float((out - reference).abs().max()), 5),
            "argmax_agreement_vs_engine": round(float((out.argmax(1) == reference.argmax(1)).float().mean()), 6)}


def _run_step(args: list[str], timeout: float) -> dict:
    t = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-m", "benchmarks.aoti_load", *args], capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    seconds = round(time.perf_counter() - t, 2)
    if r.returncode != 0:
        lines = [line for line in (r.stderr or r.stdout).strip().splitlines() if line.strip()]
        return {"error": (lines[-1] if lines else f"exit {r.returncode}")[:500], "process_seconds": seconds}
    return {**json.loads(r.stdout.strip().splitlines()[-1]), "process_seconds": seconds}


def main() -> None:
    t_process = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["fast", "fast_unfused", "plain"], choices=sorted(PARTS))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--small", action="store_true", help="8->64 features at 32x48x48 (a CPU's size)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per step")
    ap.add_argument("--json", default=None)
    ap.add_argument("--step", choices=["export", "load", "load_cpp"], help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--package", help=argparse.SUPPRESS)
    ap.add_argument("--device", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step == "export":
        print(json.dumps(step_export(args.folder, args.configs[0], args.batch, args.device, args.package)))
        return
    if args.step in ("load", "load_cpp"):
        print(json.dumps(step_load(args.package, args.device, t_process, "python" if args.step == "load" else "cpp",
                                  args.configs[0])))
        return

    import torch

    from benchmarks.case_latency import make_benchmark_model
    from benchmarks.common import machine, save

    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = tempfile.mkdtemp(prefix="trtseg_aoti_")
    folder = make_benchmark_model(os.path.join(work, "m"), args.small)
    out: dict = {"scenario": "aoti_load", "machine": machine(), "device": device, "batch": args.batch,
                 "small": args.small, "configs": {}}
    for config in args.configs:
        package = os.path.join(work, f"{config}.pt2")
        common = ["--configs", config, "--batch", str(args.batch), "--folder", folder, "--device", device,
                  "--package", package]
        entry = {"export": _run_step(["--step", "export", *common], args.timeout)}
        if "error" not in entry["export"]:
            for step in ("load", "load_cpp"):
                entry[step] = _run_step(["--step", step, *common], args.timeout)
        out["configs"][config] = entry
        save(out, args.json)


if __name__ == "__main__":
    main()
