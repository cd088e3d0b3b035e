"""--fuse-norms' convolution kernel (trtseg/accel/triton_fusion.conv3x3x3): launch configurations timed alone, then the
whole engine with the kernel's configurations as they were before the per-shape ones (ac802d8) and as they are
now, in one process on one GPU.

    python -m benchmarks.fused_conv [--batch 4] [--engine-config fp16+compile+cl+half+fold+merge+fuse+graphs]
                                    [--no-sweeps | --no-engine] [--json out.json]

Convolutions timed (fp16, channels-last-3d, width-folded by 2, with the InstanceNorm statistics, as the engine runs
them for nnU-Net's 3d_fullres 32->320 model at a 128^3 patch): the full-resolution 32->32 one (b, 32, 128^3), the
same adding a merged upsampling's slots (b, 256, 65^3), and the 64->64 one at 64^3, each also by cuDNN
(F.conv3d, cudnn.benchmark, no statistics) for reference. A configuration is (BLOCK_X coarse positions, ROWS,
num_warps, pipeline stages, KX x taps per matrix product). Each is checked against cuDNN's output before it is timed
(max |diff| over max |y| <= 1e-2, else it is reported as wrong and not ranked). Times are triton.testing.do_bench's
medians (its warm-up excluded; Triton's compile is excluded). The engine part builds the engine of --engine-config
four times, alternating ``BEFORE`` (32-channel blocks, one configuration per fold) and the modules' defaults
(``trtseg.accel.rewrites.norm_fusion.FUSED_WIDTHS``, ``trtseg.accel.rewrites.triton_fusion.CONV_CONFIGS``), and reports patches/s as
benchmarks.engine_throughput does (compile and warm-up excluded, median of --repeats).
"""
from __future__ import annotations

import argparse
import itertools
import tempfile
from typing import Any

import torch
import torch.nn.functional as F

from trtseg.accel.rewrites import triton_fusion
from benchmarks.common import machine, save

CL = torch.channels_last_3d


def _case(b: int, cin: int, cout: int, size: int, slots: bool, seed: int = 0) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn((b, cin, size, size, size), device="cuda", generator=g).half().contiguous(memory_format=CL)
    w = (torch.randn((cout, cin, 3, 3, 3), device="cuda", generator=g) / (27 * cin) ** 0.5).half()
    bias = torch.randn((cout,), device="cuda", generator=g).half()
    case = {"x": x, "w": w, "bias": bias, "taps": triton_fusion.taps_weight(w, 2), "slots": None}
    if slots:  # a full-resolution merged decoder stage's upsampled half: stride 2, lead 1 (trtseg/accel/upsample_merge)
        coarse = size // 2 + 1
        case["slots"] = torch.randn((b, 8 * cout, coarse, coarse, coarse), device="cuda",
                                    generator=g).half().contiguous(memory_format=CL)
    return case


def _run(case: dict, config):
    return triton_fusion.conv3x3x3(case["x"], case["taps"], case["bias"], fold=2, stats=True, slots=case["slots"],
                                   slot_stride=(2, 2, 2), slot_lead=(1, 1, 1), config=config)


def _reference(case: dict) -> torch.Tensor:
    y = F.conv3d(case["x"], case["w"], case["bias"], padding=1)
    if case["slots"] is not None:
        from trtseg.accel.rewrites.upsample_merge import slots_to_volume
        y = y + slots_to_volume(case["slots"], (2, 2, 2), (1, 1, 1), tuple(case["x"].shape[2:]))
    return y


def sweep(name: str, case: dict, configs, flops: float) -> dict:
    """Every configuration of ``configs`` checked against cuDNN and timed; cuDNN's own time for reference."""
    from triton.testing import do_bench
    ref = _reference(case).float()
    scale = ref.abs().max().item()
    cudnn_ms = do_bench(lambda: F.conv3d(case["x"], case["w"], case["bias"], padding=1), warmup=25, rep=100)
    rows: list[dict[str, Any]] = []
    for config in configs:
        try:
            y = _run(case, config)[0]
        except Exception as e:  # e.g. Triton's OutOfResources: the tiles need more shared memory than there is
            rows.append({"config": list(config), "error": f"{type(e).__name__}: {str(e)[:120]}"})
            continue
        err = (y.float() - ref).abs().max().item() / scale
        row: dict[str, Any] = {"config": list(config), "max_rel_err": round(err, 5)}
        if err > 1e-2:
            row["error"] = "wrong output"
        else:
            ms = do_bench(lambda: _run(case, config), warmup=25, rep=100)
            row.update(ms=round(ms, 4), tflop_per_s=round(flops / ms * 1e3 / 1e12, 1))
        rows.append(row)
        print(name, row, flush=True)
    ranked = sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])
    return {"name": name, "shape": list(case["x"].shape), "gflop": round(flops / 1e9, 1),
            "cudnn_ms_without_stats": round(cudnn_ms, 4), "best": ranked[:5], "all": rows}


def _configs(tiles, kxs, stages_set):
    return [(bx, r, wp, st, kx) for (bx, r), wp, st, kx in itertools.product(tiles, (4, 8), stages_set, kxs)]


# what --fuse-norms ran before KX and the per-shape configurations (commit ac802d8)
BEFORE: dict[str, Any] = {"widths": (32,), "conv_configs": {"2": (64, 2, 4, 4, 1), "1": (128, 1, 8, 4, 1)}}


def engine_ab(engine_config: str, batch: int, repeats: int) -> list[dict]:
    """The engine of ``engine_config`` built alternately as ``BEFORE`` and with the modules' defaults (twice each,
    one process), patches/s as benchmarks.engine_throughput measures them."""
    from trtseg.accel.rewrites import norm_fusion
    from benchmarks.case_latency import make_fullres_model
    from benchmarks.engine_throughput import engine_from_config, time_engine
    from trtseg.model_folder import load_model_folder
    model = load_model_folder(make_fullres_model(tempfile.mkdtemp(prefix="trtseg_fullres_")))
    after: dict[str, Any] = {"widths": norm_fusion.FUSED_WIDTHS, "conv_configs": dict(triton_fusion.CONV_CONFIGS)}
    runs = []
    for label, setup in (("before", BEFORE), ("after", after), ("before, again", BEFORE), ("after, again", after)):
        norm_fusion.FUSED_WIDTHS = setup["widths"]
        triton_fusion.CONV_CONFIGS.clear()
        triton_fusion.CONV_CONFIGS.update(setup["conv_configs"])
        torch._dynamo.reset()
        engine = engine_from_config(model.build_network(), engine_config)
        rate, warm = time_engine(engine, batch, model.patch_size, iters=10, repeats=repeats, warmup=3)
        runs.append({"label": label, "fused_widths": list(setup["widths"]), "fused_blocks": engine.fused_norms,
                     "conv_configs": {k: list(v) for k, v in setup["conv_configs"].items()},
                     "patches_per_s": round(rate, 1), "warmup_and_compile_seconds_excluded": round(warm, 1)})
        print(runs[-1], flush=True)
        del engine
        torch.cuda.empty_cache()
    norm_fusion.FUSED_WIDTHS = after["widths"]
    triton_fusion.CONV_CONFIGS.clear()
    triton_fusion.CONV_CONFIGS.update(after["conv_configs"])
    return runs


def run_sweeps(result: dict, b: int) -> None:
    full = _case(b, 32, 32, 128, slots=False)
    flops_full = 2.0 * b * 128 ** 3 * 32 * 32 * 27
    main_sweep = sweep("32->32 at 128^3, stats", full, [triton_fusion.conv_config(2, 32)]
                       + _configs([(64, 2), (128, 1), (32, 4), (128, 2)], (2, 4), (3, 4)), flops_full)
    result["sweeps"].append(main_sweep)
    best = tuple(main_sweep["best"][0]["config"])
    top = [tuple(r["config"]) for r in main_sweep["best"][:4]]
    del full
    merged = _case(b, 32, 32, 128, slots=True)
    result["sweeps"].append(sweep("32->32 at 128^3, stats, adding merged slots", merged,
                                  list(dict.fromkeys([triton_fusion.conv_config(2, 32, True)] + top)), flops_full))
    del merged
    half = _case(b, 64, 64, 64, slots=False)
    result["sweeps"].append(sweep("64->64 at 64^3, stats", half, [triton_fusion.conv_config(2, 64)]
                                  + _configs([(64, 2), (128, 1), (32, 4)], (1, 2), (2, 3)),
                                  2.0 * b * 64 ** 3 * 64 * 64 * 27))
    del half
    torch.cuda.empty_cache()
    result["environment_for_the_fastest"] = "TRTSEG_CONV_CONFIGS=2/32:" + ",".join(map(str, best))
    print(result["environment_for_the_fastest"], flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--engine-config", default="fp16+compile+cl+half+fold+merge+fuse+graphs")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-engine", action="store_true", help="time the convolutions only")
    ap.add_argument("--no-sweeps", action="store_true", help="the engine comparison only")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    b = args.batch
    result = {"scenario": "fused_conv", "machine": machine(), "batch": b,
              "module_default_configs": {k: list(v) for k, v in triton_fusion.CONV_CONFIGS.items()},
              "sweeps": []}
    if not args.no_sweeps:
        run_sweeps(result, b)
        if args.json:  # the sweeps stand on their own: kept even if the engine part is cut short
            save(result, args.json)
    if not args.no_engine:
        result["engine_config"] = args.engine_config
        result["engine"] = engine_ab(args.engine_config, b, args.repeats)
    save(result, args.json)


if __name__ == "__main__":
    main()
