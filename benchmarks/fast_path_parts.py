"""What each fast part does to the masks and the speed of the benchmark's 3d_fullres network, part by part:

    python -m benchmarks.fast_path_parts [--json F]

Model: nnU-Net's 3d_fullres CT topology (PlainConvUNet 32->320, 128^3 patch, seeded random weights), batch 2.
Patches: the fast path's own check patches (trtseg.accel.fast_path.check_patches, 4) and 8 real tiles of a
preprocessed CT-like 512x512x240 volume (trtseg.accel.patches.sample_patches). Each configuration's masks are
compared with fp32's and with fp16 autocast's (nnU-Net's precision on CUDA, the fast path's fallback), and its
engine timed on 10 calls of one batch after its first call (which compiles). It explains the fast path's check rule
(trtseg/accel/fast_path.py, ``_check``): fp16 autocast itself moves more than 0.1 % of this network's voxels.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time

import torch

from benchmarks.case_latency import make_fullres_model
from benchmarks.common import machine, save, write_ct
from trtseg.accel import fast_path as fp
from trtseg.accel.engines import build_engine
from trtseg.accel.patches import sample_patches
from trtseg.model_folder import load_model_folder
from trtseg.options import EngineSpec

STEPS = {"compile": ["compile"], "c+cl+w": ["compile", "channels-last", "fp16-weights"],
         "c+cl+w+fold": ["compile", "channels-last", "fp16-weights", "fold-convolutions"],
         "c+cl+w+fold+merge": ["compile", "channels-last", "fp16-weights", "fold-convolutions", "merge-upsampling"],
         "all": ["compile", "channels-last", "fp16-weights", "fold-convolutions", "merge-upsampling", "fuse-norms"],
         "cl+w+fold+merge+fuse (no compile)": ["channels-last", "fp16-weights", "fold-convolutions",
                                               "merge-upsampling", "fuse-norms"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="trtseg_parts_")
    folder = make_fullres_model(os.path.join(work, "m"))
    os.makedirs(os.path.join(work, "in"))
    write_ct(os.path.join(work, "in", "ct_0000.nii.gz"))
    model = load_model_folder(folder, ["0"])
    device = torch.device("cuda")
    cache = os.path.join(work, "cache")
    sets = {"check": fp.check_patches(model),
            "real": torch.from_numpy(sample_patches(model, os.path.join(work, "in"), 8, seed=1))}
    base = EngineSpec(cache=cache, batch_size=2)
    configs = {"fp32": EngineSpec("torch", precision="fp32", fast=False, batch_size=2),
               "fp16": dataclasses.replace(base, fast=False),
               **{name: fp._with_parts(base, parts) for name, parts in STEPS.items()}}
    masks: dict = {}
    out: dict = {"scenario": "fast_path_parts", "machine": machine(), "batch": 2, "configs": {}}
    for name, spec in configs.items():
        t = time.perf_counter()
        engine = build_engine(model, "0", spec, "torch", device, cache)
        masks[name] = {k: fp.masks(engine, v, 2) for k, v in sets.items()}
        entry = {"first_calls_seconds": round(time.perf_counter() - t, 1)}
        x = sets["real"][:2].to(device)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            engine.infer(x)
        torch.cuda.synchronize()
        entry["patches_per_s"] = round(20 / (time.perf_counter() - t), 1)
        for k in sets:
            entry[f"{k}_vs_fp32"] = round(fp.agreement(masks["fp32"][k], masks[name][k]), 6)
            entry[f"{k}_vs_fp16"] = round(fp.agreement(masks["fp16"][k], masks[name][k]), 6) \
                if "fp16" in masks else None
        out["configs"][name] = entry
        del engine
        torch.cuda.empty_cache()
    save(out, args.json)


if __name__ == "__main__":
    main()
