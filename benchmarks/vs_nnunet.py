"""Case latency against nnUNetv2 itself: the same model folder, volume, GPU and settings, masks compared.

    python -m benchmarks.vs_nnunet [--shape 512 512 240] [--mirroring off on] [--json results.json]

nnU-Net runs as `nnUNetv2_predict` does (nnUNetPredictor.predict_from_files, 3 preprocessing and 3 export
processes, everything on the device). trtseg runs in one process with torch.compile (fp16, batch 4) and igzip
level 1 for the written mask; its compile/warm-up run is excluded and stated, nnU-Net's single run includes its
own start-up of worker processes (as a user sees it). Model loading is excluded on both sides.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import nibabel as nib
import numpy as np
import torch

from benchmarks.case_latency import make_fullres_model
from benchmarks.common import machine, save
from trtseg import synthetic as syn
from trtseg.dataset import list_cases
from trtseg.model_folder import load_model_folder
from trtseg.options import EngineSpec, OutputOptions, Settings, WindowOptions
from trtseg.predict import Predictor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", nargs=3, type=int, default=[512, 512, 240])
    ap.add_argument("--mirroring", nargs="+", default=["off", "on"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    work = tempfile.mkdtemp(prefix="trtseg_vs_nnunet_")
    model_dir = make_fullres_model(os.path.join(work, "model"))
    os.makedirs(os.path.join(work, "in"))
    src = syn.save_nifti(os.path.join(work, "in", "ct_0000.nii.gz"), syn.ct_like_volume(args.shape, seed=0),
                         syn.affine_for((0.7, 0.7, 1.25)))
    model = load_model_folder(model_dir)
    case = list_cases(os.path.join(work, "in"), 1)[0]
    out = {"scenario": "vs_nnunet", "machine": machine(), "shape_xyz": args.shape, "runs": {}}
    for m in args.mirroring:
        mirror = m == "on"
        nn = nnUNetPredictor(tile_step_size=0.5, use_mirroring=mirror, device=torch.device("cuda"),
                             perform_everything_on_device=True, allow_tqdm=False)
        nn.initialize_from_trained_model_folder(model_dir, use_folds=(0,))
        ref_dir = os.path.join(work, f"nnunet_{m}")
        t = time.perf_counter()
        nn.predict_from_files([[src]], ref_dir, save_probabilities=False, overwrite=True,
                              num_processes_preprocessing=3, num_processes_segmentation_export=3)
        nn_s = time.perf_counter() - t
        pred = Predictor(model, Settings(window=WindowOptions(use_mirroring=mirror),
                                         engine=EngineSpec("torch", "cuda", "fp16", 4, compile="default"),
                                         output=OutputOptions(compress_level=1)))
        t = time.perf_counter()
        pred.predict_case(case, os.path.join(work, f"trtseg_{m}"))
        warm = time.perf_counter() - t
        walls, stages = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            r = pred.predict_case(case, os.path.join(work, f"trtseg_{m}"))
            walls.append(time.perf_counter() - t)
            stages.append(r.seconds)
        a = np.asarray(nib.load(os.path.join(ref_dir, "ct.nii.gz")).dataobj)
        b = np.asarray(nib.load(r.output).dataobj)
        out["runs"][f"mirroring_{m}"] = {
            "nnunetv2_predict_seconds": round(nn_s, 2), "trtseg_median_seconds": round(float(np.median(walls)), 3),
            "speedup": round(nn_s / float(np.median(walls)), 1), "trtseg_stage_seconds_last": stages[-1],
            "trtseg_warmup_and_compile_seconds_excluded": round(warm, 1),
            "voxel_agreement": float((a == b).mean()), "labels_nnunet": [int(v) for v in np.unique(a)]}
        print(out["runs"][f"mirroring_{m}"], flush=True)
        del pred, nn
        torch.cuda.empty_cache()
    save(out, args.json)


if __name__ == "__main__":
    main()
