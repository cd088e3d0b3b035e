"""Where the engine's time goes: GPU kernel time of the 3d_fullres network per kind of kernel, under torch.profiler.

    python -m benchmarks.engine_profile [--config fp16+compile+cl+half] [--batch 4] [--iters 10] [--json out.json]

The configuration has engine_throughput's syntax. After warm-up (and compile, excluded), --iters batches run under
the profiler; every CUDA kernel's time is summed by name, and names are sorted into kinds: convolution (cuDNN and
CUTLASS kernels), transposed convolution, fused normalization and activation (Inductor's Triton kernels), copies
and layout changes, and the rest. Figures are per batch, in milliseconds of GPU time.
"""
from __future__ import annotations

import argparse
import re
import tempfile
from collections import defaultdict

import torch

from benchmarks.case_latency import make_fullres_model
from benchmarks.common import machine, save
from benchmarks.engine_throughput import engine_from_config
from trtseg.model_folder import load_model_folder

KINDS = [  # (kind, pattern on the kernel's name), first match wins; Inductor names its Triton kernels after every
    # op they fused (e.g. triton_poi_fused__native_batch_norm_legit__to_copy_clone_convolution_leaky_relu_...)
    ("fused convolution + normalization (trtseg/accel/rewrites/triton_fusion.py)", r"^_(conv3x3x3|stem|norm_act_pointwise)_kernel"),
    ("normalization statistics (Triton reductions)", r"^triton_(red|per)_"),
    ("normalize + LeakyReLU, casts, concatenation (Triton pointwise)", r"^triton_poi_"),
    ("transposed convolution", r"dgrad|convTranspose|ConvTranspose|col2im"),
    ("convolution", r"conv|xmma|cudnn|implicit|fprop|cutlass|sm\d+_|gemm|winograd"),
    ("copies and layout", r"[Cc]opy|cat|transpose|nchw|nhwc|permute|memcpy|Memset|fill"),
]


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name):
            return kind
    return "other"


def kernel_ms_per_batch(engine, x: torch.Tensor, iters: int) -> dict[str, tuple[float, float]]:
    """GPU time (ms) and calls of every CUDA kernel per ``engine.infer(x)``, after 3 warm-up batches (excluded),
    from ``iters`` batches under torch.profiler."""
    for _ in range(3):
        engine.infer(x)
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(iters):
            engine.infer(x)
        torch.cuda.synchronize()
    per_name: dict[str, list] = defaultdict(lambda: [0.0, 0])  # name -> [microseconds, calls]
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            per_name[evt.name][0] += evt.device_time
            per_name[evt.name][1] += 1
    return {name: (us * 1e-3 / iters, calls / iters) for name, (us, calls) in per_name.items()}


def by_kind(per_name: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Kernel milliseconds summed by kind (``KINDS``), largest first."""
    kinds: dict[str, float] = defaultdict(float)
    for name, (ms, _) in per_name.items():
        kinds[kind_of(name)] += ms
    return {k: round(v, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="fp16+compile+cl+half")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model = load_model_folder(make_fullres_model(tempfile.mkdtemp(prefix="trtseg_fullres_")))
    # without CUDA graphs, as this profile has always been taken ("graphs" in the config is ignored here)
    engine = engine_from_config(model.build_network(), args.config, static_batch=args.batch, cuda_graphs=False)
    x = torch.randn((args.batch, 1, *model.patch_size), device="cuda")
    per_name = kernel_ms_per_batch(engine, x, args.iters)
    total = sum(ms for ms, _ in per_name.values())
    result = {"scenario": "engine_profile", "machine": machine(), "config": args.config, "batch": args.batch,
              "iters": args.iters, "gpu_ms_per_batch": round(total, 3),
              "patches_per_s_from_kernel_time": round(args.batch / (total * 1e-3), 1),
              "by_kind_ms_per_batch": by_kind(per_name),
              "top_kernels": [{"name": n[:160], "kind": kind_of(n), "ms_per_batch": round(ms, 3), "calls_per_batch": c}
                              for n, (ms, c) in sorted(per_name.items(), key=lambda kv: -kv[1][0])[:args.top]]}
    print(f"{args.config} batch {args.batch}: {result['gpu_ms_per_batch']} ms of kernels per batch")
    for k, v in result["by_kind_ms_per_batch"].items():
        print(f"  {v:9.3f} ms  {100 * v / result['gpu_ms_per_batch']:5.1f} %  {k}")
    for t in result["top_kernels"]:
        print(f"  {t['ms_per_batch']:9.3f} ms  x{t['calls_per_batch']:<5g} {t['kind'][:12]:12s} {t['name'][:110]}")
    save(result, args.json)


if __name__ == "__main__":
    main()
