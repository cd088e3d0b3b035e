"""CPU: trtseg's CPU engines against nnUNetv2 on the CPU, on a small model, on the CPU it runs on.

    python -m benchmarks.cpu_vs_nnunet [--json results.json]

Model: PlainConvUNet 8->64 features, 4 stages, 32x48x48 patch, 3 labels, seeded random weights (last layer spread
so every label appears). Volume: CT-like, 128x128x60 at 0.9x0.9x2.5 mm, resampled to 2.5x1x1 mm (z, y, x).
Mirroring off. nnU-Net runs predict_from_files_sequential (no worker processes, as fits 2 cores); trtseg runs
in one process with the ONNX Runtime and PyTorch CPU engines. One warm-up run each (excluded), then the median of
--repeats; masks compared voxel by voxel.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import nibabel as nib
import numpy as np
import torch

from benchmarks.common import machine, save
from trtseg import synthetic as syn
from trtseg.dataset import list_cases
from trtseg.model_folder import load_model_folder
from trtseg.options import EngineSpec, Settings, WindowOptions
from trtseg.predict import Predictor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    work = tempfile.mkdtemp(prefix="trtseg_cpu_")
    model_dir = syn.make_model_folder(os.path.join(work, "model"), folds=(0,), patch_size=(32, 48, 48),
                                      spacing=(2.5, 1.0, 1.0), features=(8, 16, 32, 64))
    os.makedirs(os.path.join(work, "in"))
    src = syn.save_nifti(os.path.join(work, "in", "ct_0000.nii.gz"), syn.ct_like_volume((128, 128, 60), seed=1),
                         syn.affine_for((0.9, 0.9, 2.5)))
    os.makedirs(os.path.join(work, "nnunet"))
    nn = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    nn.initialize_from_trained_model_folder(model_dir, use_folds=(0,))
    times = []
    for i in range(args.repeats + 1):
        t = time.perf_counter()
        nn.predict_from_files_sequential([[src]], [os.path.join(work, "nnunet", "ct")], save_probabilities=False,
                                         overwrite=True)
        times.append(time.perf_counter() - t)
    out = {"scenario": "cpu_vs_nnunet", "machine": machine(), "torch_threads": torch.get_num_threads(),
           "nnunetv2_seconds": round(statistics.median(times[1:]), 3), "runs": {}}
    ref = np.asarray(nib.load(os.path.join(work, "nnunet", "ct.nii.gz")).dataobj)
    model = load_model_folder(model_dir)
    case = list_cases(os.path.join(work, "in"), 1)[0]
    for engine in ("onnxruntime", "torch"):
        pred = Predictor(model, Settings(window=WindowOptions(use_mirroring=False),
                                         engine=EngineSpec(engine, "cpu", batch_size=2,
                                                           cache=os.path.join(work, "cache"))))
        walls, r = [], None
        for i in range(args.repeats + 1):
            t = time.perf_counter()
            r = pred.predict_case(case, os.path.join(work, engine))
            walls.append(time.perf_counter() - t)
        assert r is not None and r.status == "ok", r
        mask = np.asarray(nib.load(r.output).dataobj)
        out["runs"][engine] = {"median_seconds": round(statistics.median(walls[1:]), 3), "stage_seconds": r.seconds,
                               "speedup_vs_nnunet": round(out["nnunetv2_seconds"] / statistics.median(walls[1:]), 2),
                               "voxel_agreement_vs_nnunet": float((mask == ref).mean())}
    save(out, args.json)


if __name__ == "__main__":
    main()
