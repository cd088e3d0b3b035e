"""Case latency: one CT-sized volume through `trtseg` (read -> preprocess -> infer -> export -> write), per stage.

    python -m benchmarks.case_latency [--shape 512 512 240] [--device cuda] [--repeats 3] [--json results.json]

The model is nnU-Net's 3d_fullres shape for CT (PlainConvUNet 32->320 features, 6 stages, 128^3 patch, 4 labels)
with seeded random weights; the volume is CT-like (air, body, organs, bone, noise) at 0.7 x 0.7 x 1.25 mm,
resampled to the plans' 1.0 x 0.78 x 0.78 mm (z, y, x). One full case runs first as warm-up (cuDNN autotuning,
allocator growth) and is excluded; the figures are medians over --repeats runs, with and without mirroring.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import nibabel as nib
import numpy as np
import torch

from benchmarks.common import machine, median_stages, save
from trtseg import codec
from trtseg import synthetic as syn
from trtseg.dataset import list_cases
from trtseg.model_folder import load_model_folder
from trtseg.options import EngineSpec, OutputOptions, Settings, WindowOptions, add_options, from_args
from trtseg.predict import Predictor

FULLRES_FEATURES = (32, 64, 128, 256, 320, 320)


def make_fullres_model(folder: str, patch=(128, 128, 128), spacing=(1.0, 0.78, 0.78)) -> str:
    ds = syn.dataset_dict(num_channels=1, num_labels=4)
    return syn.make_model_folder(folder, folds=(0,), patch_size=patch, spacing=spacing, features=FULLRES_FEATURES,
                                 dataset_json=ds)


def make_benchmark_model(folder: str, small: bool = False) -> str:
    """``make_fullres_model``'s network, or with ``small`` one a CPU runs in seconds (8->64 features at 32x48x48):
    the benchmarks' --small smoke runs."""
    if not small:
        return make_fullres_model(folder)
    return syn.make_model_folder(folder, folds=(0,), patch_size=(32, 48, 48), spacing=(1.0, 0.78, 0.78),
                                 features=(8, 16, 32, 64), dataset_json=syn.dataset_dict(num_channels=1, num_labels=4))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", nargs=3, type=int, default=[512, 512, 240], help="x y z voxels")
    ap.add_argument("--spacing", nargs=3, type=float, default=[0.7, 0.7, 1.25], help="x y z mm")
    add_options(ap, EngineSpec, defaults=EngineSpec("torch", batch_size=4))  # the same flags as trtseg predict
    add_options(ap, OutputOptions)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mirroring", choices=["off", "on", "both"], default="both")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    return ap


def main() -> None:
    args = parser().parse_args()

    work = args.workdir or tempfile.mkdtemp(prefix="trtseg_bench_")
    t0 = time.perf_counter()
    model_dir = make_fullres_model(os.path.join(work, "model"))
    os.makedirs(os.path.join(work, "in"), exist_ok=True)
    syn.save_nifti(os.path.join(work, "in", "ct_0000.nii.gz"), syn.ct_like_volume(args.shape, seed=0),
                   syn.affine_for(args.spacing))
    setup_s = time.perf_counter() - t0
    model = load_model_folder(model_dir)
    case = list_cases(os.path.join(work, "in"), 1)[0]
    result = {"scenario": "case_latency", "machine": machine(), "shape_xyz": args.shape, "spacing_xyz": args.spacing,
              "model": {"features": FULLRES_FEATURES, "patch": model.patch_size, "target_spacing_zyx": model.spacing},
              "setup_seconds": round(setup_s, 2), "runs": {}}
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.mirroring]
    for mirror in modes:
        settings = Settings(window=WindowOptions(use_mirroring=mirror), engine=from_args(EngineSpec, args),
                            output=from_args(OutputOptions, args))
        pred = Predictor(model, settings)
        t = time.perf_counter()
        warm = pred.predict_case(case, os.path.join(work, "out"))
        warm_s = time.perf_counter() - t
        assert warm.status == "ok", warm.error
        runs, walls = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            r = pred.predict_case(case, os.path.join(work, "out"))
            walls.append(time.perf_counter() - t)
            runs.append(r.seconds)
        entry = {"settings": {**settings.to_json(), "device": str(settings.engine.resolved_device()),
                              "precision": settings.engine.resolved_precision(), "engine_spec": settings.engine.text(),
                              "gzip": codec.backend()},
                 "warmup_seconds_excluded": round(warm_s, 3), "median_stage_seconds": median_stages(runs),
                 "median_wall_seconds": round(float(np.median(walls)), 3), "repeats": args.repeats,
                 "labels_present": [int(v) for v in np.unique(np.asarray(nib.load(r.output).dataobj))]}
        if torch.cuda.is_available():
            entry["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
        result["runs"]["mirroring_on" if mirror else "mirroring_off"] = entry
        del pred
    save(result, args.json)


if __name__ == "__main__":
    main()
