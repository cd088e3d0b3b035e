"""Engine throughput: patches/s and achieved TFLOP/s of the network alone, per engine, precision and batch size.

    python -m benchmarks.engine_throughput [--device cuda] [--batches 1 2 4 8] [--configs fp16+compile+cl ...]
                                           [--json results.json]

A configuration is an engine spec in trtseg's one text syntax (EngineSpec.parse, trtseg/options.py; kind torch
on --device): a precision (fp32, fp16, bf16) with options joined by "+", named as `trtseg predict`'s flags or by
their short forms: compile, max (max-autotune), cl (channels-last), graphs (cuda-graphs), half (fp16-weights),
fold (fold-convolutions, trtseg/accel/rewrites/conv_fold.py), merge (merge-upsampling, trtseg/accel/rewrites/upsample_merge.py),
fuse (fuse-norms, trtseg/accel/rewrites/norm_fusion.py; needs cl and half).

Model: nnU-Net 3d_fullres for CT (PlainConvUNet 32->320, 6 stages, 128^3 patch, 4 labels). FLOPs per patch are
counted with torch's FlopCounterMode (multiply-add = 2 FLOPs). Inputs are standard-normal patches (the
distribution after normalization); engine time does not depend on values. Per configuration: warm-up iterations
(and, for torch.compile, the compile) are excluded and reported separately; the figure is the median of
--repeats timed runs of --iters batches each, CUDA-synchronized.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from trtseg.accel.engines import torch_engine
from trtseg.accel.torch_engine import TorchEngine
from trtseg.options import EngineSpec
from benchmarks.case_latency import make_fullres_model
from benchmarks.common import machine, save
from trtseg.model_folder import load_model_folder

TENSOR_CORE_FLOOR_PATCHES_S = 840  # the measured fp16 tensor-core floor on the H100 (docs of this project's issues)


def flops_per_patch(net: torch.nn.Module, patch, device) -> float:
    x = torch.zeros((1, 1, *patch), device=device)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        net(x)
    return float(counter.get_total_flops())


def engine_from_config(network: torch.nn.Module, config: str, device="cuda", **overrides) -> TorchEngine:
    """A TorchEngine for ``config`` in EngineSpec's text syntax ("fp16+compile+cl+...", trtseg/options.py);
    ``overrides`` replace the keyword arguments the options give (e.g. static_batch)."""
    engine = torch_engine(network, EngineSpec.parse(config, EngineSpec("torch", device)), device, **overrides)
    assert isinstance(engine, TorchEngine)
    return engine


def time_engine(engine, batch: int, patch, iters: int, repeats: int, warmup: int) -> tuple[float, float]:
    x = torch.randn((batch, 1, *patch), device=engine.device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        engine.infer(x)
    torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    rates = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(iters):
            engine.infer(x)
        torch.cuda.synchronize()
        rates.append(batch * iters / (time.perf_counter() - t))
    return statistics.median(rates), warm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--configs", nargs="+", default=["fp32", "fp16", "bf16", "fp16+compile"])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model = load_model_folder(make_fullres_model(tempfile.mkdtemp(prefix="trtseg_fullres_")))
    patch = model.patch_size
    flops = flops_per_patch(model.build_network().to(args.device), patch, args.device)
    result = {"scenario": "engine_throughput", "machine": machine(), "patch": patch, "gflop_per_patch": round(flops / 1e9, 1),
              "tensor_core_floor_patches_s": TENSOR_CORE_FLOOR_PATCHES_S, "runs": []}
    for cfg in args.configs:
        for b in args.batches:
            torch._dynamo.reset()  # each configuration compiles afresh, for its batch size only
            engine = engine_from_config(model.build_network(), cfg, args.device)
            try:
                rate, warm = time_engine(engine, b, patch, args.iters, args.repeats, warmup=3)
            except torch.OutOfMemoryError:
                result["runs"].append({"config": cfg, "batch": b, "error": "out of memory"})
                continue
            result["runs"].append({"config": cfg, "batch": b, "patches_per_s": round(rate, 1),
                                   "tflop_per_s": round(rate * flops / 1e12, 1),
                                   "fraction_of_floor": round(rate / TENSOR_CORE_FLOOR_PATCHES_S, 3),
                                   "warmup_and_compile_seconds_excluded": round(warm, 1)})
            print(result["runs"][-1], flush=True)
            del engine
            torch.cuda.empty_cache()
    save(result, args.json)


if __name__ == "__main__":
    main()
