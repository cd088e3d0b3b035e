"""The CUDA path against the CPU path: same model folders, same files, masks compared voxel by voxel.

    python -m benchmarks.gpu_parity [--json results.json]

Cases mirror tests/test_parity.py (anisotropic, oblique, zero borders, smaller than the patch, two folds,
ResidualEncoderUNet with transposed plans, ZScore with mask and torch resampling). The CPU path runs fp32; the
CUDA path runs fp32 and fp16 autocast (nnU-Net's default on GPUs). The bar is 99.9 % voxel agreement.
"""
from __future__ import annotations

import argparse
import os
import tempfile

import nibabel as nib
import numpy as np

from benchmarks.common import machine, save
from trtseg import synthetic as syn
from trtseg.dataset import list_cases
from trtseg.model_folder import load_model_folder
from trtseg.options import EngineSpec, Settings
from trtseg.predict import Predictor


def scenarios(work: str):
    def case(folder, cid, shape, spacing, deg=0.0, seed=0, border=0, channels=1):
        os.makedirs(folder, exist_ok=True)
        for c in range(channels):
            syn.save_nifti(os.path.join(folder, f"{cid}_{c:04d}.nii.gz"),
                           syn.ct_like_volume(shape, seed=seed + 17 * c, zero_border=border),
                           syn.affine_for(spacing, deg, origin=(-12.5, 30.0, 7.25)))
        return folder

    m1 = syn.make_model_folder(f"{work}/m1", folds=(0, 1), patch_size=(24, 32, 40), spacing=(2.0, 1.0, 1.0),
                               features=(4, 8, 16))
    case(f"{work}/in1", "aniso", (70, 61, 23), (0.8, 0.8, 3.1), 20, 0, 3)
    case(f"{work}/in1", "tiny", (21, 17, 9), (1.0, 1.0, 2.0), 5, 5)
    yield "plain_2folds", m1, f"{work}/in1", ["0", "1"]
    m2 = syn.make_model_folder(f"{work}/m2", folds=(0,), arch="ResidualEncoderUNet", patch_size=(32, 24, 32),
                               spacing=(1.0, 1.5, 1.0), features=(4, 8, 16), transpose_forward=(1, 0, 2), seed=11)
    yield "resenc_transposed", m2, case(f"{work}/in2", "res", (50, 40, 33), (1.2, 0.9, 1.6), 12, 7), ["0"]
    m3 = syn.make_model_folder(f"{work}/m3", folds=(0,), patch_size=(16, 32, 32), spacing=(3.0, 1.0, 1.0),
                               features=(4, 8, 16), normalization=("ZScoreNormalization", "ZScoreNormalization"),
                               use_mask_for_norm=(True, False), resampling="torch",
                               dataset_json=syn.dataset_dict(num_channels=2, num_labels=4), seed=21)
    yield "zscore_torchresample", m3, case(f"{work}/in3", "mr", (48, 44, 30), (0.9, 0.9, 2.2), 30, 9, 4, 2), ["0"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="trtseg_gpu_parity_")
    out = {"scenario": "gpu_parity", "machine": machine(), "bar": 0.999, "cases": []}
    for name, model_dir, in_dir, folds in scenarios(work):
        model = load_model_folder(model_dir, folds)
        paths = {}
        for tag, s in {"cpu_fp32": Settings(engine=EngineSpec(device="cpu")),
                       "cuda_fp32": Settings(engine=EngineSpec(device="cuda", precision="fp32")),
                       "cuda_fp16": Settings(engine=EngineSpec(device="cuda", precision="fp16"))}.items():
            pred = Predictor(model, s)
            for c in list_cases(in_dir, model.num_input_channels):
                r = pred.predict_case(c, f"{work}/{name}_{tag}")
                assert r.status == "ok", r.error
                paths.setdefault(c.case_id, {})[tag] = r.output
        for cid, p in paths.items():
            ref = np.asarray(nib.load(p["cpu_fp32"]).dataobj)
            row = {"model": name, "case": cid, "labels": [int(v) for v in np.unique(ref)]}
            for tag in ("cuda_fp32", "cuda_fp16"):
                row[f"agreement_{tag}_vs_cpu"] = float((np.asarray(nib.load(p[tag]).dataobj) == ref).mean())
            out["cases"].append(row)
    out["all_meet_bar"] = all(min(r["agreement_cuda_fp32_vs_cpu"], r["agreement_cuda_fp16_vs_cpu"]) >= 0.999
                              for r in out["cases"])
    save(out, args.json)


if __name__ == "__main__":
    main()
