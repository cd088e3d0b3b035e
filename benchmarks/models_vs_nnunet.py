"""The cascade (3d_lowres -> 3d_cascade_fullres) against nnUNetv2 doing the same, whole commands, on one GPU.

    python -m benchmarks.cascade_vs_nnunet [--cases 2] [--shape 512 512 240] [--json results.json]

Both sides run their two commands as a user does, each a fresh process, timed from start to exit:
- nnUNetv2: `nnUNetv2_predict -c 3d_lowres`, then `-c 3d_cascade_fullres -prev_stage_predictions LOWRES_OUT`
  (nnUNetv2's own predict_entry_point, default workers, no mirroring);
- trtseg: `trtseg predict -m LOWRES`, then `trtseg predict -m CASCADE --prev-stage-predictions LOWRES_OUT`,
  default flags except --disable-tta, in one process each (--single-process).

Models: nnU-Net's 3d_fullres CT topology (PlainConvUNet 32->320, 6 stages, 128^3 patch) for both stages with seeded
random weights, the low-res stage at 2.5 x 1.95 x 1.95 mm. Inputs: CT-like 512x512x240 volumes at 0.7 x 0.7 x
1.25 mm. The masks are compared voxel for voxel: each stage end to end, and trtseg's cascade stage given nnU-Net's
own low-res masks (the stage alone; random weights amplify any difference in the previous stage's input).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import nibabel as nib
import numpy as np

from benchmarks.case_latency import FULLRES_FEATURES
from benchmarks.common import machine, save
from trtseg import synthetic as syn


def _timed(cmd: list[str], env: dict) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed ({r.returncode}): {(r.stdout + r.stderr)[-2000:]}")
    return round(time.perf_counter() - t, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=2)
    ap.add_argument("--shape", nargs=3, type=int, default=[512, 512, 240])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="trtseg_cascade_")
    results = os.path.join(work, "results")
    lowres, full = syn.make_cascade_folders(os.path.join(results, "Dataset088_CT"), seed=5, features=FULLRES_FEATURES,
                                            fullres_patch=(128, 128, 128), fullres_spacing=(1.0, 0.78, 0.78),
                                            lowres_patch=(128, 128, 128), lowres_spacing=(2.5, 1.95, 1.95),
                                            dataset_json=syn.dataset_dict(num_channels=1, num_labels=4))
    inp = os.path.join(work, "in")
    os.makedirs(inp)
    for i in range(args.cases):
        syn.save_nifti(os.path.join(inp, f"ct{i}_0000.nii.gz"), syn.ct_like_volume(args.shape, seed=i),
                       syn.affine_for((0.7, 0.7, 1.25)))
    env = {**os.environ, "nnUNet_results": results, "nnUNet_raw": work, "nnUNet_preprocessed": work}
    py = sys.executable
    nn = [py, "-c", "import sys; from nnunetv2.inference.predict_from_raw_data import predict_entry_point; "
          "sys.argv[0] = 'nnUNetv2_predict'; predict_entry_point()"]
    out = {"scenario": "cascade_vs_nnunet", "machine": machine(), "cases": args.cases, "shape_xyz": args.shape}
    out["nnunetv2_seconds"] = {
        "3d_lowres": _timed([*nn, "-i", inp, "-o", os.path.join(work, "nn_low"), "-d", "88", "-c", "3d_lowres",
                             "-f", "0", "--disable_tta"], env),
        "3d_cascade_fullres": _timed([*nn, "-i", inp, "-o", os.path.join(work, "nn_full"), "-d", "88", "-c",
                                      "3d_cascade_fullres", "-f", "0", "--disable_tta", "-prev_stage_predictions",
                                      os.path.join(work, "nn_low")], env)}
    ts = [py, "-m", "trtseg.cli", "predict", "-i", inp, "--disable-tta", "--single-process", "--no-progress"]
    out["trtseg_seconds"] = {
        "3d_lowres": _timed([*ts, "-o", os.path.join(work, "ts_low"), "-m", lowres], env),
        "3d_cascade_fullres": _timed([*ts, "-o", os.path.join(work, "ts_full"), "-m", full,
                                      "--prev-stage-predictions", os.path.join(work, "ts_low")], env)}
    # trtseg's cascade stage given nnU-Net's own low-res masks: the stage alone, apart from the low-res differences
    out["trtseg_cascade_on_nnunet_lowres_seconds"] = _timed([*ts, "-o", os.path.join(work, "ts_full_nnlow"), "-m",
                                                             full, "--prev-stage-predictions",
                                                             os.path.join(work, "nn_low")], env)
    nn_total, ts_total = sum(out["nnunetv2_seconds"].values()), sum(out["trtseg_seconds"].values())
    out["nnunetv2_total_seconds"], out["trtseg_total_seconds"] = round(nn_total, 2), round(ts_total, 2)
    out["speedup"] = round(nn_total / ts_total, 1)
    agreement = {}
    pairs = {"3d_lowres": ("nn_low", "ts_low"), "3d_cascade_fullres": ("nn_full", "ts_full"),
             "3d_cascade_fullres_given_nnunets_lowres": ("nn_full", "ts_full_nnlow")}
    for stage, (a_dir, b_dir) in pairs.items():
        for i in range(args.cases):
            a = np.asarray(nib.load(os.path.join(work, a_dir, f"ct{i}.nii.gz")).dataobj)
            b = np.asarray(nib.load(os.path.join(work, b_dir, f"ct{i}.nii.gz")).dataobj)
            agreement[f"{stage}/ct{i}"] = float((a == b).mean())
    out["voxel_agreement_vs_nnunet"] = agreement
    save(out, args.json)


if __name__ == "__main__":
    main()
