"""The models nnU-Net users deploy besides one configuration, against nnUNetv2 doing the same, whole commands, on
one GPU:

    python -m benchmarks.models_vs_nnunet --scenario cascade|ensemble [--cases 2] [--shape 512 512 240] [--json F]
        [--skip-accumulate-fp16] [--skip-stages] [--nnunet-given-trtseg-lowres]

- cascade: nnUNetv2's two commands, `nnUNetv2_predict -c 3d_lowres`, then `-c 3d_cascade_fullres
  -prev_stage_predictions LOWRES_OUT`, against one `trtseg predict -m LOWRES CASCADE` (both stages in one job).
  Then each stage on its own, against nnU-Net's output of that stage: `trtseg predict -m LOWRES`, and `trtseg
  predict -m CASCADE --prev-stage-predictions LOWRES_OUT` given nnU-Net's own low-res masks. With
  --nnunet-given-trtseg-lowres, nnU-Net's cascade stage once more, given trtseg's low-res masks, against its own
  chained output: how far the cascade network itself carries the low-res stage's few differing voxels into the
  final masks, with no trtseg code in the final stage (nnU-Net against nnU-Net).
- ensemble: nnUNetv2's four, `nnUNetv2_predict -c 3d_fullres --save_probabilities`, the same for 3d_lowres,
  `nnUNetv2_ensemble` and `nnUNetv2_apply_postprocessing` (a postprocessing.pkl keeping the largest foreground
  component and the largest component of label 1), against one `trtseg predict -m FULLRES LOWRES --postprocessing
  postprocessing.pkl`.

Each command is a fresh process, timed from start to exit, as a user runs it: nnUNetv2's entry points with their
default workers; trtseg with default flags and --single-process (two cases on one GPU: the Ray job's start-up
would be most of the time). trtseg runs twice, into two output folders: first with an empty engine cache (cold:
the fast path checks each model's engine against fp32 before its first case), then with the cache the first run
left (warm: what every later scheduled run of the same models pays). Both sides run without mirroring
(--disable_tta / --disable-tta), to keep nnUNetv2's side within minutes.

Models: nnU-Net's 3d_fullres CT topology (PlainConvUNet 32->320, 6 stages, 128^3 patch) for every configuration,
seeded random weights, the low-res configuration at 2.5 x 1.95 x 1.95 mm. Inputs: CT-like 512x512x240 volumes at
0.7 x 0.7 x 1.25 mm. The final masks are compared voxel for voxel with nnUNetv2's.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time

import nibabel as nib
import numpy as np
import torch

from benchmarks.case_latency import FULLRES_FEATURES
from benchmarks.common import machine, save
from trtseg import synthetic as syn


_PROGRESS: dict = {}  # steps timed so far, written to the result file after each (a run cut short keeps them)


def _timed(cmd: list[str], env: dict, step: str = "") -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed ({r.returncode}): {(r.stdout + r.stderr)[-2000:]}")
    seconds = round(time.perf_counter() - t, 2)
    if _PROGRESS.get("path"):
        _PROGRESS.setdefault("steps", {})[step or " ".join(cmd[-4:])] = seconds
        with open(_PROGRESS["path"] + ".partial", "w") as f:
            json.dump(_PROGRESS["steps"], f, indent=2)
    return seconds


def _nnunet(entry: str, name: str) -> list[str]:
    """A nnUNetv2 console script as a module call (the console scripts need not be installed)."""
    module, fn = entry.rsplit(":", 1)
    return [sys.executable, "-c", f"import sys; from {module} import {fn}; sys.argv[0] = '{name}'; {fn}()"]


def _models(results: str) -> dict[str, str]:
    """Dataset088: 3d_lowres, 3d_cascade_fullres and 3d_fullres trained-model folders of one plans.json."""
    lowres, cascade = syn.make_cascade_folders(os.path.join(results, "Dataset088_CT"), seed=5,
                                               features=FULLRES_FEATURES, fullres_patch=(128, 128, 128),
                                               fullres_spacing=(1.0, 0.78, 0.78), lowres_patch=(128, 128, 128),
                                               lowres_spacing=(2.5, 1.95, 1.95),
                                               dataset_json=syn.dataset_dict(num_channels=1, num_labels=4))
    plans, ds = (json.load(open(os.path.join(lowres, f))) for f in ("plans.json", "dataset.json"))
    torch.manual_seed(7)
    net = syn.build_network(plans, ds, "3d_fullres")
    syn._spread_logits(net, plans, 1, 8.0, 7)
    fullres = syn.write_model_folder(os.path.join(results, "Dataset088_CT", "nnUNetTrainer__nnUNetPlans__3d_fullres"),
                                     plans, ds, {0: net.state_dict()}, "3d_fullres")
    return {"3d_lowres": lowres, "3d_cascade_fullres": cascade, "3d_fullres": fullres}


def _agreement(work: str, a_dir: str, b_dir: str, cases: int) -> dict[str, float]:
    out = {}
    for i in range(cases):
        a = np.asarray(nib.load(os.path.join(work, a_dir, f"ct{i}.nii.gz")).dataobj)
        b = np.asarray(nib.load(os.path.join(work, b_dir, f"ct{i}.nii.gz")).dataobj)
        out[f"ct{i}"] = float((a == b).mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", choices=["cascade", "ensemble"], required=True)
    ap.add_argument("--cases", type=int, default=2)
    ap.add_argument("--shape", nargs=3, type=int, default=[512, 512, 240])
    ap.add_argument("--json", default=None)
    ap.add_argument("--skip-accumulate-fp16", action="store_true", help="no second trtseg run with --accumulate fp16")
    ap.add_argument("--skip-stages", action="store_true",
                    help="cascade: no runs of each stage on its own (the low-res stage; the cascade stage given "
                         "nnU-Net's low-res masks)")
    ap.add_argument("--nnunet-given-trtseg-lowres", action="store_true",
                    help="cascade, with the stages: nnU-Net's cascade stage given trtseg's low-res masks, against "
                         "nnU-Net's chained output (the cascade network's own sensitivity to its input masks)")
    args = ap.parse_args()
    _PROGRESS["path"] = args.json
    work = tempfile.mkdtemp(prefix="trtseg_models_")
    results = os.path.join(work, "results")
    models = _models(results)
    inp = os.path.join(work, "in")
    os.makedirs(inp)
    for i in range(args.cases):
        syn.save_nifti(os.path.join(inp, f"ct{i}_0000.nii.gz"), syn.ct_like_volume(args.shape, seed=i),
                       syn.affine_for((0.7, 0.7, 1.25)))
    env = {**os.environ, "nnUNet_results": results, "nnUNet_raw": work, "nnUNet_preprocessed": work,
           "TRTSEG_CACHE": os.path.join(work, "cache")}  # empty: the first trtseg run is cold
    predict = _nnunet("nnunetv2.inference.predict_from_raw_data:predict_entry_point", "nnUNetv2_predict")
    nn_common = ["-i", inp, "-d", "88", "-f", "0", "--disable_tta",
                 *([] if torch.cuda.is_available() else ["-device", "cpu"])]
    ts = [sys.executable, "-m", "trtseg.cli", "predict", "-i", inp, "--disable-tta", "--single-process",
          "--no-progress"]
    out: dict = {"scenario": f"models_vs_nnunet/{args.scenario}", "machine": machine(), "cases": args.cases,
                 "shape_xyz": args.shape, "mirroring": False}
    pp = os.path.join(work, "postprocessing.pkl")
    if args.scenario == "cascade":
        out["trtseg_command"] = "trtseg predict -m 3d_lowres 3d_cascade_fullres --disable-tta --single-process"
        ts_args = ["-m", models["3d_lowres"], models["3d_cascade_fullres"]]
    else:
        from nnunetv2.postprocessing.remove_connected_components import \
            remove_all_but_largest_component_from_segmentation as keep_largest
        with open(pp, "wb") as f:
            pickle.dump(([keep_largest] * 2, [{"labels_or_regions": [1, 2, 3]}, {"labels_or_regions": 1}]), f)
        out["trtseg_command"] = ("trtseg predict -m 3d_fullres 3d_lowres --postprocessing postprocessing.pkl "
                                 "--disable-tta --single-process")
        ts_args = ["-m", models["3d_fullres"], models["3d_lowres"], "--postprocessing", pp]
    # trtseg first: a run cut short still has its figure. Cold, then warm (the engine cache the cold run left)
    out["trtseg_seconds"] = _timed([*ts, "-o", os.path.join(work, "ts"), *ts_args], env, "trtseg")
    out["trtseg_warm_seconds"] = _timed([*ts, "-o", os.path.join(work, "ts_warm"), *ts_args], env, "trtseg_warm")
    if args.scenario == "cascade":
        low = os.path.join(work, "nn_low")
        out["nnunetv2_seconds"] = {
            "nnUNetv2_predict -c 3d_lowres": _timed([*predict, *nn_common, "-o", low, "-c", "3d_lowres"], env),
            "nnUNetv2_predict -c 3d_cascade_fullres -prev_stage_predictions": _timed(
                [*predict, *nn_common, "-o", os.path.join(work, "nn"), "-c", "3d_cascade_fullres",
                 "-prev_stage_predictions", low], env)}
    else:
        ens = _nnunet("nnunetv2.ensembling.ensemble:entry_point_ensemble_folders", "nnUNetv2_ensemble")
        app = _nnunet("nnunetv2.postprocessing.remove_connected_components:entry_point_apply_postprocessing",
                      "nnUNetv2_apply_postprocessing")
        a, b, m = (os.path.join(work, d) for d in ("nn_full", "nn_low", "nn_mean"))
        out["nnunetv2_seconds"] = {
            "nnUNetv2_predict -c 3d_fullres --save_probabilities": _timed(
                [*predict, *nn_common, "-o", a, "-c", "3d_fullres", "--save_probabilities"], env),
            "nnUNetv2_predict -c 3d_lowres --save_probabilities": _timed(
                [*predict, *nn_common, "-o", b, "-c", "3d_lowres", "--save_probabilities"], env),
            "nnUNetv2_ensemble": _timed([*ens, "-i", a, b, "-o", m], env),
            "nnUNetv2_apply_postprocessing": _timed(
                [*app, "-i", m, "-o", os.path.join(work, "nn"), "-pp_pkl_file", pp, "-plans_json",
                 os.path.join(a, "plans.json"), "-dataset_json", os.path.join(a, "dataset.json")], env)}
    nn_total = sum(out["nnunetv2_seconds"].values())
    out["nnunetv2_total_seconds"] = round(nn_total, 2)
    out["speedup"] = round(nn_total / out["trtseg_seconds"], 1)
    out["speedup_warm"] = round(nn_total / out["trtseg_warm_seconds"], 1)
    out["voxel_agreement_vs_nnunet"] = _agreement(work, "nn", "ts", args.cases)
    out["voxel_agreement_warm_vs_cold"] = _agreement(work, "ts", "ts_warm", args.cases)
    save(out, args.json)  # the main figures, before the optional runs below (a run cut short keeps them)
    if args.scenario == "cascade" and not args.skip_stages:
        # where the one-job cascade's disagreement comes from: the low-res stage alone, and the cascade stage given
        # nnU-Net's own low-res masks (-prev_stage_predictions), each against nnU-Net's output of the same stage
        low_ts = os.path.join(work, "ts_low")
        out["trtseg_lowres_alone_seconds"] = _timed([*ts, "-o", low_ts, "-m", models["3d_lowres"]], env)
        out["voxel_agreement_lowres_stage_vs_nnunet"] = _agreement(work, "nn_low", "ts_low", args.cases)
        save(out, args.json)
        out["trtseg_given_nnunet_lowres_seconds"] = _timed(
            [*ts, "-o", os.path.join(work, "ts_given"), "-m", models["3d_cascade_fullres"],
             "--prev-stage-predictions", os.path.join(work, "nn_low")], env)
        out["voxel_agreement_cascade_given_nnunet_lowres"] = _agreement(work, "nn", "ts_given", args.cases)
        save(out, args.json)
        if args.nnunet_given_trtseg_lowres:
            out["nnunetv2_given_trtseg_lowres_seconds"] = _timed(
                [*predict, *nn_common, "-o", os.path.join(work, "nn_given"), "-c", "3d_cascade_fullres",
                 "-prev_stage_predictions", low_ts], env)
            out["voxel_agreement_nnunet_given_trtseg_lowres_vs_nnunet"] = _agreement(work, "nn", "nn_given",
                                                                                    args.cases)
    if args.scenario == "ensemble":
        out["postprocessing_changed_voxels"] = 1.0 - min(_agreement(work, "nn_mean", "nn", args.cases).values())
        report = json.load(open(os.path.join(work, "ts", "run_report.json")))
        out["trtseg_postprocessing"] = [c["postprocessing"] for c in report["cases"]]
        out["trtseg_case_seconds"] = [c["seconds"] for c in report["cases"]]
    # the same trtseg command with nnU-Net's own float16 sums (--accumulate fp16): agreement only
    if not args.skip_accumulate_fp16:
        out["trtseg_accumulate_fp16_seconds"] = _timed([*ts, "-o", os.path.join(work, "ts16"), "--accumulate",
                                                        "fp16", *ts_args], env)
        out["voxel_agreement_vs_nnunet_accumulate_fp16"] = _agreement(work, "nn", "ts16", args.cases)
    save(out, args.json)


if __name__ == "__main__":
    main()
