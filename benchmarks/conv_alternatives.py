"""Where the engine's convolution time could go: per-layer cuDNN times, cuDNN's fused graphs, width-folded convolutions.

    python -m benchmarks.conv_alternatives [--batch 4] [--benchmark-limit N] [--parts layers fusion fold]
                                           [--json out.json]

The model is engine_throughput's (nnU-Net 3d_fullres for CT, 32->320 features, 128^3 patch); everything runs in fp16,
channels-last-3d, with cudnn.benchmark on. Three parts:

1. layers: every convolution and transposed convolution of the network, found by forward hooks on one batch, timed
   alone (F.conv3d / F.conv_transpose3d, median of 3 runs of 20 calls after 3 warm-up calls, CUDA events), with the
   kernel cuDNN picked, in ms and TFLOP/s per call. --benchmark-limit sets torch.backends.cudnn.benchmark_limit, the
   number of cuDNN algorithms PyTorch times per shape (PyTorch's default 10; 0 times all of them).
2. fusion: what would drop the normalization passes (about a quarter of the engine's GPU time) is InstanceNorm and
   LeakyReLU applied inside the next convolution as it reads its input, and the next InstanceNorm's sums computed
   as the convolution writes its output. cuDNN's graph API expresses both: a scale, bias and (leaky) ReLU prologue,
   and a genstats epilogue (per-channel sum and sum of squares). Each graph is built for the full-resolution
   32->32 convolution at batch 1 (per-channel statistics are per-instance there); for each: whether any engine
   supports it, its fastest plan's time against torch's convolution, and its relative error. Needs the
   nvidia-cudnn-frontend package; the part is skipped, with the reason, without it.
3. fold: width-folded convolutions (trtseg/accel/rewrites/conv_fold.py, fold 2): the full-resolution 32->32 and 64->32 ones timed
   alone against the plain ones, then the whole network under torch.compile with fp16 weights, plain against its
   32->32 convolutions folded (the engine's --fold-convolutions), as GPU kernel time per batch by kind of kernel
   (engine_profile's profiler).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import traceback

import torch
import torch.nn.functional as F

from trtseg.accel.torch_engine import TorchEngine
from benchmarks.case_latency import make_fullres_model
from benchmarks.common import machine, save
from trtseg.accel.rewrites.conv_fold import WidthFoldedConv3d, fold_narrow_convolutions
from benchmarks.engine_profile import by_kind, kernel_ms_per_batch
from trtseg.model_folder import load_model_folder

CL = torch.channels_last_3d


# ---- timing ---------------------------------------------------------------------------------------------------------

def time_call(fn, iters: int = 20, repeats: int = 3) -> float:
    """Median ms per call of ``fn`` over ``repeats`` runs of ``iters`` calls, after 3 warm-up calls (CUDA events)."""
    for _ in range(3):
        fn()
    runs = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        runs.append(start.elapsed_time(end) / iters)
    return statistics.median(runs)


def kernel_names(fn) -> list[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sorted({e.name[:120] for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA})


def network_convolutions(network: torch.nn.Module, x: torch.Tensor) -> list[dict]:
    """The network's convolutions with the input shape each sees on ``x`` (forward hooks), identical ones merged."""
    seen: dict[tuple, dict] = {}

    def hook(module, inputs, _output):
        key = (type(module).__name__, module.in_channels, module.out_channels, module.kernel_size, module.stride,
               module.padding, tuple(inputs[0].shape))
        seen.setdefault(key, {"module": module, "input_shape": tuple(inputs[0].shape), "count": 0})["count"] += 1

    handles = [m.register_forward_hook(hook) for m in network.modules()
               if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))]
    with torch.inference_mode():
        network(x)
    for h in handles:
        h.remove()
    return list(seen.values())


def part_layers(network: torch.nn.Module, x: torch.Tensor) -> list[dict]:
    rows = []
    with torch.inference_mode():
        for entry in network_convolutions(network, x):
            m = entry["module"]
            inp = torch.randn(entry["input_shape"], device="cuda", dtype=torch.half).contiguous(memory_format=CL)
            w = m.weight.detach().half().contiguous(memory_format=CL)
            transposed = isinstance(m, torch.nn.ConvTranspose3d)
            if transposed:
                def call():
                    return F.conv_transpose3d(inp, w, None, m.stride, m.padding)
            else:
                def call():
                    return F.conv3d(inp, w, None, m.stride, m.padding)
            out = call()
            k = m.kernel_size[0] * m.kernel_size[1] * m.kernel_size[2]
            flops = 2 * k * m.in_channels * m.out_channels * (inp.numel() // m.in_channels if transposed
                                                              else out.numel() // m.out_channels)
            ms = time_call(call)
            rows.append({"layer": f"{'transposed ' if transposed else ''}{m.in_channels}->{m.out_channels} k{m.kernel_size[0]} "
                                  f"s{m.stride[0]} at {list(entry['input_shape'][2:])}", "count": entry["count"],
                         "ms": round(ms, 3), "tflop_per_s": round(flops / ms / 1e9, 1), "kernels": kernel_names(call)})
            print(rows[-1], flush=True)
    return rows


def part_fusion(batch_shape=(1, 32, 128, 128, 128), cout: int = 32) -> dict:
    """cuDNN graph API: 32->32 3x3x3 convolution with a norm+LeakyReLU prologue and/or a genstats epilogue."""
    try:
        import cudnn  # nvidia-cudnn-frontend
    except ImportError as e:
        return {"skipped": f"nvidia-cudnn-frontend is not installed ({e})"}
    out: dict = {"cudnn_backend_version": cudnn.backend_version()}
    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    cin = batch_shape[1]
    x = torch.randn(batch_shape, device="cuda", dtype=torch.half).contiguous(memory_format=CL)
    w = (torch.randn(cout, cin, 3, 3, 3, device="cuda", dtype=torch.half) * 0.05).contiguous(memory_format=CL)
    scale = (torch.rand(1, cin, 1, 1, 1, device="cuda", dtype=torch.half) + 0.5).contiguous(memory_format=CL)
    shift = (torch.randn(1, cin, 1, 1, 1, device="cuda", dtype=torch.half) * 0.1).contiguous(memory_format=CL)
    out["torch_conv_ms"] = round(time_call(lambda: F.conv3d(x, w, None, 1, 1)), 3)
    for name, prologue, genstats, slope in [("prologue (scale, bias, LeakyReLU 0.01)", True, False, 0.01),
                                            ("prologue (scale, bias, ReLU)", True, False, None),
                                            ("genstats epilogue", False, True, None),
                                            ("prologue + genstats (ConvBNfprop)", True, True, 0.01)]:
        try:
            y = torch.empty((batch_shape[0], cout, *batch_shape[2:]), device="cuda", dtype=torch.half
                            ).contiguous(memory_format=CL)
            sums = torch.zeros((1, cout, 1, 1, 1), device="cuda").contiguous(memory_format=CL)
            squares = torch.zeros_like(sums)
            g = cudnn.pygraph(io_data_type=cudnn.data_type.HALF, intermediate_data_type=cudnn.data_type.HALF,
                              compute_data_type=cudnn.data_type.FLOAT, handle=handle)
            X = g.tensor(name="X", dim=list(x.shape), stride=list(x.stride()), data_type=x.dtype)
            W = g.tensor(name="W", dim=list(w.shape), stride=list(w.stride()), data_type=w.dtype)
            pack = {X: x, W: w}
            a = X
            if prologue:
                S = g.tensor(name="S", dim=list(scale.shape), stride=list(scale.stride()), data_type=scale.dtype)
                B = g.tensor(name="B", dim=list(shift.shape), stride=list(shift.stride()), data_type=shift.dtype)
                a = g.bias(name="shift", input=g.scale(name="scale", input=X, scale=S), bias=B)
                a = g.relu(name="act", input=a, negative_slope=slope) if slope else g.relu(name="act", input=a)
                pack.update({S: scale, B: shift})
            Y = g.conv_fprop(image=a, weight=W, padding=[1, 1, 1], stride=[1, 1, 1], dilation=[1, 1, 1])
            Y.set_output(True).set_data_type(cudnn.data_type.HALF)
            pack[Y] = y
            if genstats:
                SUM, SQ = g.genstats(name="stats", input=Y)
                SUM.set_output(True).set_data_type(cudnn.data_type.FLOAT)
                SQ.set_output(True).set_data_type(cudnn.data_type.FLOAT)
                pack.update({SUM: sums, SQ: squares})
            g.validate()
            g.build_operation_graph()
            g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.B, cudnn.heur_mode.FALLBACK])
            g.check_support()
            g.build_plans(cudnn.build_plan_policy.ALL)
            workspace = torch.empty(max(g.get_workspace_size(), 1 << 20), device="cuda", dtype=torch.uint8)
            times: dict[int, float | str] = {}
            for i in range(g.get_execution_plan_count()):
                try:
                    times[i] = round(time_call(lambda: g.execute_plan_at_index(pack, workspace, i, handle=handle)), 3)
                except Exception as e:  # a plan that builds but does not run
                    times[i] = type(e).__name__
            ok = {i: t for i, t in times.items() if isinstance(t, float)}
            best = min(ok, key=lambda i: ok[i])
            g.execute_plan_at_index(pack, workspace, best, handle=handle)
            torch.cuda.synchronize()
            inp = F.leaky_relu(x.float() * scale.float() + shift.float(), slope or 0.0).half() if prologue else x
            ref = F.conv3d(inp, w, None, 1, 1).float()
            out[name] = {"supported": True, "plans": len(times), "best_ms": ok[best],
                         "relative_error": round(((y.float() - ref).abs().max() / ref.abs().max()).item(), 6)}
        except Exception as e:
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            out[name] = {"supported": False, "error": first}
            traceback.print_exc(limit=1)
        print(name, out[name], flush=True)
    cudnn.destroy_handle(handle)
    return out


def part_fold(model, batch: int) -> dict:
    res: dict = {"layers": {}, "network_kernel_ms_per_batch": {}}
    shape = (batch, 32, *model.patch_size)
    with torch.inference_mode():
        for cin in (32, 64):
            conv = torch.nn.Conv3d(cin, 32, 3, padding=1, bias=False).cuda().half()
            conv = conv.to(memory_format=CL)  # type: ignore[call-overload]
            folded = WidthFoldedConv3d(conv, 2).to(memory_format=CL)  # type: ignore[call-overload]
            x = torch.randn((batch, cin, *shape[2:]), device="cuda", dtype=torch.half).contiguous(memory_format=CL)
            ref = conv(x).float()
            err = ((folded(x).float() - ref).abs().max() / ref.abs().max()).item()
            res["layers"][f"{cin}->32 at {list(shape[2:])}"] = {
                "plain_ms": round(time_call(lambda: conv(x)), 3), "folded_ms": round(time_call(lambda: folded(x)), 3),
                "relative_error": round(err, 6)}
    x = torch.randn((batch, 1, *model.patch_size), device="cuda")
    for label in ("plain", "32->32 folded by 2"):
        network = model.build_network()
        if label != "plain":
            res["folded_convolutions"] = fold_narrow_convolutions(network)
        torch._dynamo.reset()
        engine = TorchEngine(network, "cuda", "fp16", compile=True, channels_last=True, fp16_weights=True,
                             static_batch=batch)
        per_name = kernel_ms_per_batch(engine, x, iters=10)
        res["network_kernel_ms_per_batch"][label] = {"total": round(sum(ms for ms, _ in per_name.values()), 3),
                                                     "by_kind": by_kind(per_name)}
        print(label, res["network_kernel_ms_per_batch"][label], flush=True)
        del engine
        torch.cuda.empty_cache()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--benchmark-limit", type=int, default=None)
    ap.add_argument("--parts", nargs="+", default=["layers", "fusion", "fold"], choices=["layers", "fusion", "fold"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    if args.benchmark_limit is not None:
        torch.backends.cudnn.benchmark_limit = args.benchmark_limit
    model = load_model_folder(make_fullres_model(tempfile.mkdtemp(prefix="trtseg_fullres_")))
    result: dict = {"scenario": "conv_alternatives", "machine": machine(), "batch": args.batch,
                    "cudnn": torch.backends.cudnn.version(), "benchmark_limit": torch.backends.cudnn.benchmark_limit}
    if "layers" in args.parts:
        network = model.build_network().cuda().half().to(memory_format=CL)  # type: ignore[call-overload]
        x = torch.zeros((args.batch, 1, *model.patch_size), device="cuda", dtype=torch.half).contiguous(memory_format=CL)
        result["layers"] = part_layers(network, x)
        del network
    if "fusion" in args.parts:
        result["fusion"] = part_fusion()
    if "fold" in args.parts:
        result["fold"] = part_fold(model, args.batch)
    save(result, args.json)


if __name__ == "__main__":
    main()
