"""Masks of the PyTorch CUDA engine at reduced precision against FP32, on a CT-sized case.

    python -m benchmarks.precision_masks [--shape 512 512 240] [--json results.json]

The 3d_fullres 32->320 model (random weights, last layer spread so every label appears) segments one CT-like
volume with fp32, fp16 autocast, bf16 autocast, fp16 under torch.compile, with channels-last, and an fp16 network
with fp32 normalization layers (--fp16-weights), that one with its 32-channel convolutions width-folded
(--fold-convolutions), that one with its decoder's upsamplings merged (--merge-upsampling), and that one with its
full-resolution normalizations fused into Triton kernels (--fuse-norms); each mask is compared voxel by voxel with
the fp32 mask (the bar is 99.9 %).
"""
from __future__ import annotations

import argparse
import os
import tempfile

import nibabel as nib
import numpy as np

from benchmarks.case_latency import make_fullres_model
from benchmarks.common import machine, save
from trtseg import synthetic as syn
from trtseg.dataset import list_cases
from trtseg.model_folder import load_model_folder
from trtseg.options import EngineSpec, Settings, WindowOptions
from trtseg.predict import Predictor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", nargs=3, type=int, default=[512, 512, 240])
    ap.add_argument("--only", nargs="+", default=None, help="these configurations (fp32 is always run)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="trtseg_prec_")
    model = load_model_folder(make_fullres_model(os.path.join(work, "model")))
    os.makedirs(os.path.join(work, "in"))
    syn.save_nifti(os.path.join(work, "in", "ct_0000.nii.gz"), syn.ct_like_volume(args.shape, seed=3),
                   syn.affine_for((0.7, 0.7, 1.25)))
    case = list_cases(os.path.join(work, "in"), 1)[0]
    masks = {}
    # each configuration in EngineSpec's text syntax (trtseg/options.py), over torch on cuda at batch 4
    specs = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "fp16_compiled": "fp16+compile",
             "fp16_compiled_channels_last": "fp16+compile+cl",
             "fp16_weights_compiled_channels_last": "fp16+compile+cl+half",
             "fp16_weights_compiled_channels_last_folded": "fp16+compile+cl+half+fold",
             "fp16_weights_compiled_channels_last_folded_merged": "fp16+compile+cl+half+fold+merge",
             "fp16_weights_compiled_channels_last_folded_merged_fused": "fp16+compile+cl+half+fold+merge+fuse"}
    base = EngineSpec("torch", "cuda", batch_size=4)
    configs = {name: Settings(window=WindowOptions(use_mirroring=False), engine=EngineSpec.parse(text, base))
               for name, text in specs.items()}
    for name, s in configs.items():
        if args.only and name != "fp32" and name not in args.only:
            continue
        r = Predictor(model, s).predict_case(case, os.path.join(work, name))
        assert r.status == "ok", r.error
        masks[name] = np.asarray(nib.load(r.output).dataobj)
    ref = masks["fp32"]
    out = {"scenario": "precision_masks", "machine": machine(), "shape_xyz": args.shape, "bar": 0.999,
           "labels_fp32": [int(v) for v in np.unique(ref)],
           "agreement_vs_fp32": {k: float((m == ref).mean()) for k, m in masks.items() if k != "fp32"}}
    out["all_meet_bar"] = all(v >= 0.999 for v in out["agreement_vs_fp32"].values())
    save(out, args.json)


if __name__ == "__main__":
    main()
