"""8-bit convolutions (trtseg/accel/rewrites/conv8.py) against fp16 on the GPU: each convolution shape of the network,
then the whole network, in one run:

    python -m benchmarks.conv8_throughput [--formats fp8 int8] [--batch 4] [--no-sweep] [--json F] [--small]

1. Per shape: every convolution the 8-bit kernel runs in nnU-Net's 3d_fullres CT network (32->320, 6 stages, 128^3
   patch) at --batch, timed (triton.testing.do_bench, median ms) as cuDNN's fp16 channels-last convolution and as
   the 8-bit kernel on its quantized input, for each launch configuration in SWEEP (fp8; int8 with fp8's fastest),
   with achieved TFLOP/s. The fastest configurations are printed as a TRTSEG_CONV8_CONFIGS value and used below.
2. The network: patches/s and TFLOP/s of the fp16 engine as the fast default builds it ("fp16+compile+cl+half+fold+
   merge+fuse"), of the fp16 engine without rewrites ("fp16+compile+cl+half", the 8-bit engine's base), and of each
   --formats engine as --precision fp8|int8 builds it ("fp8+compile+cl+half"): that base with its convolutions on
   the 8-bit kernel, calibrated (quant8.calibrate, percentile)
   on smooth random patches (trtseg.accel.fast_path.check_patches). Medians of --repeats runs of --iters batches.
3. Agreement of each engine's masks with the fp32 network's on other such patches.

--small: 8->64 features at 32x48x48, for a smoke run on the CPU in Triton's interpreter (TRITON_INTERPRET=1; step 1
only, each shape timed once, figures meaningless). Weights are seeded random (what is measured is speed; accuracy on a trained network is the precision gate's, see
trtseg/accel/precision.py and tests/test_quant8.py).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.nn.functional as F

from benchmarks.case_latency import make_benchmark_model
from benchmarks.common import machine, save
from benchmarks.engine_throughput import engine_from_config, flops_per_patch, time_engine
from trtseg.accel import quant8
from trtseg.accel.fast_path import check_patches, masks
from trtseg.accel.rewrites import conv8
from trtseg.model_folder import load_model_folder

CL = torch.channels_last_3d
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, stages) tried on each shape; config_for narrows N and K to the layer
SWEEP = [(128, 64, 64, 4, 3), (128, 128, 64, 8, 3), (64, 64, 64, 4, 4), (128, 64, 128, 8, 3), (256, 64, 64, 8, 3)]
FP16_FAST = "fp16+compile+cl+half+fold+merge+fuse"
FP16_BASE = "fp16+compile+cl+half"


def _bench(fn, device: str) -> float:
    """Milliseconds of ``fn``: triton.testing.do_bench's median on CUDA, one timed call elsewhere."""
    if device == "cuda":
        from triton.testing import do_bench
        return float(do_bench(fn))
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def conv_shapes(network: torch.nn.Module, batch: int, patch, device: str) -> list[dict]:
    """The distinct (cin, cout, kernel, stride, input size) of the convolutions the 8-bit kernel runs, with their
    count in the network."""
    layers = {n: m for n, m in quant8.quantizable_layers(network).items() if conv8.supports(m)}
    seen: dict[tuple, dict] = {}

    def hook(name):
        def record(module, inputs):
            x = inputs[0]
            key = (module.in_channels, module.out_channels, tuple(module.kernel_size), tuple(module.stride),
                   tuple(x.shape[2:]))
            seen.setdefault(key, {"cin": key[0], "cout": key[1], "kernel": list(key[2]), "stride": list(key[3]),
                                  "size": list(key[4]), "layers": []})["layers"].append(name)
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    with torch.no_grad():
        network(torch.zeros((batch, 1, *patch), device=device))
    for h in handles:
        h.remove()
    return list(seen.values())


def time_shape(shape: dict, batch: int, formats: list[str], sweep: bool, device: str) -> dict:
    cin, cout, kernel, stride = shape["cin"], shape["cout"], tuple(shape["kernel"]), tuple(shape["stride"])
    layer = torch.nn.Conv3d(cin, cout, kernel, stride=stride, padding=tuple(k // 2 for k in kernel)).to(device)
    x = torch.randn((batch, cin, *shape["size"]), device=device).half().contiguous(memory_format=CL)
    w16 = layer.weight.detach().half().contiguous(memory_format=CL)
    x16 = x if device == "cuda" else x.float()  # the CPU has no fp16 convolution
    w16 = w16 if device == "cuda" else w16.float()
    out = F.conv3d(x16, w16, None, stride, layer.padding)
    flop = 2.0 * out.numel() * cin * kernel[0] * kernel[1] * kernel[2]
    torch.backends.cudnn.benchmark = True
    ms16 = _bench(lambda: F.conv3d(x16, w16, None, stride, layer.padding), device)
    row = {**shape, "gflop": round(flop / 1e9, 2), "fp16_cudnn_ms": round(ms16, 4),
           "fp16_cudnn_tflop_s": round(flop / ms16 / 1e9, 1)}
    best_config = None
    for fmt in formats:
        scale = float(x.float().abs().max()) / quant8.FORMATS[fmt][1]
        xq = quant8.quantize(x, scale, fmt).contiguous(memory_format=CL)
        taps, w_scales = conv8.tap_weights(layer.weight, fmt)
        configs = SWEEP if (sweep and best_config is None) else [best_config or conv8.config_for(cin, cout,
                                                                                                  max(stride))]
        timings = {}
        for config in (conv8.narrowed(c, cin, cout) for c in configs):
            if config in timings:
                continue
            try:
                timings[config] = _bench(lambda: conv8.conv8(xq, taps, w_scales, None, scale, kernel, stride,
                                                             config=config), device)
            except Exception as e:  # a configuration that does not compile (shared memory) is skipped
                timings[config] = float("inf")
                # a Triton CompilationError's message is the source excerpt; the reason is its cause
                why = e.__cause__ or e
                row.setdefault("errors", []).append(f"{fmt} {config}: {type(e).__name__}: {type(why).__name__} "
                                                    f"{str(why)[-300:]}")
        config, ms = min(timings.items(), key=lambda kv: kv[1])
        best_config = best_config or config
        row[f"{fmt}_ms"] = round(ms, 4)
        row[f"{fmt}_tflop_s"] = round(flop / ms / 1e9, 1)
        row[f"{fmt}_config"] = list(config)
        row[f"{fmt}_speedup_vs_fp16"] = round(ms16 / ms, 2)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", nargs="+", default=["fp8", "int8"], choices=sorted(quant8.FORMATS))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-sweep", action="store_true", help="per shape, only the configuration conv8 would pick")
    ap.add_argument("--small", action="store_true", help="8->64 features at 32x48x48: a smoke run on the CPU")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise SystemExit("conv8_throughput: no GPU; set TRITON_INTERPRET=1 (and --small) for a smoke run on the CPU")
    model = load_model_folder(make_benchmark_model(os.path.join(tempfile.mkdtemp(prefix="trtseg_conv8_"), "m"),
                                                   args.small))
    patch = model.patch_size
    fp32 = model.build_network().to(device).eval()
    flops = flops_per_patch(fp32, patch, device)
    out: dict = {"scenario": "conv8_throughput", "machine": machine(), "patch": patch, "batch": args.batch,
                 "gflop_per_patch": round(flops / 1e9, 1), "shapes": [], "engines": {}}
    for shape in conv_shapes(fp32, args.batch, patch, device):
        out["shapes"].append(time_shape(shape, args.batch, args.formats, not args.no_sweep, device))
        print(out["shapes"][-1], flush=True)
        save(out, args.json)
    fastest = {f"{s['cin']}/{s['cout']}/{max(s['stride'])}": s[f"{args.formats[0]}_config"] for s in out["shapes"]}
    out["TRTSEG_CONV8_CONFIGS"] = ";".join(f"{k}:{','.join(map(str, v))}" for k, v in fastest.items())
    conv8.CONV8_CONFIGS.update({k: tuple(v) for k, v in fastest.items()})  # type: ignore[misc]
    save(out, args.json)
    if device != "cuda":
        return

    calibration = check_patches(model, 4, seed=1).cuda()
    test = check_patches(model, 4, seed=2)
    with torch.no_grad():
        want = masks(_Fp32(fp32), test, 2)
    for name, config, fmt in [("fp16_fast_default", FP16_FAST, None), ("fp16_base", FP16_BASE, None),
                              *[(f"{f}_on_base", FP16_BASE, f) for f in args.formats]]:
        torch._dynamo.reset()
        entry: dict = {"config": config if fmt is None else config.replace("fp16", fmt, 1)}
        try:
            if fmt is None:
                engine = engine_from_config(model.build_network(), config, "cuda", static_batch=args.batch)
            else:  # the engine --precision fp8|int8 builds, on these scales
                scales = quant8.calibrate(fp32, calibration, fmt, "percentile", batch=2)
                engine = engine_from_config(model.build_network(), entry["config"], "cuda", static_batch=args.batch,
                                            input_scales=scales)
                entry["quantized_layers"] = engine.quantized_convolutions
                entry["calibration"] = {"method": "percentile", "patches": "fast_path.check_patches(4, seed=1)"}
            rate, warm = time_engine(engine, args.batch, patch, args.iters, args.repeats, warmup=3)
            entry.update(patches_per_s=round(rate, 1), tflop_per_s=round(rate * flops / 1e12, 1),
                         warmup_and_compile_seconds_excluded=round(warm, 1),
                         mask_agreement_vs_fp32=round(float((masks(engine, test, args.batch) == want).double()
                                                            .mean()), 6))
        except Exception as e:
            entry["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        out["engines"][name] = entry
        print(name, entry, flush=True)
        save(out, args.json)
        engine = None
        torch.cuda.empty_cache()


class _Fp32:
    """The fp32 network as ``fast_path.masks`` takes an engine."""

    def __init__(self, network):
        self.network, self.device = network, torch.device("cuda")

    def infer(self, batch):
        return self.network(batch.float())


if __name__ == "__main__":
    main()
