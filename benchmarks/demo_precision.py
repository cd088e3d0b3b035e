"""The demo's trained brain model on its real scans at each precision: Dice against the reference masks, voxel
agreement with fp32, and the 8-bit calibration used:

    python -m benchmarks.demo_precision [--data data/demo] [--precisions fp32 int8 fp8] [--device cpu|cuda]
        [--calibration-method percentile] [--json F]

Each precision is one `trtseg predict --single-process --engine torch` process over the demo's cases (Colin27 at
1 mm and resliced to 1x1x3 mm, reference ch2bet > 0; `trtseg demo`'s inputs), mirroring as the model allows.
The 8-bit engines calibrate on the MNI152 template (the model's training template, not a test case), so the
scans they are scored on are not the ones their scales came from; the gate's --max-dice-drop is the default
(0.005, on the template against fp32); a refused engine is run again with --max-dice-drop 1 (the same
calibration, from the engine cache) to score how far it is off. On the CPU the 8-bit layers run quant8's float32 reference, the function
the GPU kernel computes up to the order of its float32 sums (int8: exactly), so CPU figures are the 8-bit
formats' accuracy and say nothing of speed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import nibabel as nib
import numpy as np

from benchmarks.common import machine, save
from trtseg import demo
from trtseg.accel.precision import dice_per_label


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/demo")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "int8", "fp8"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--calibration-method", default="percentile")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="trtseg_demo_precision_")
    cases = demo.prepare_inputs(args.data, work)
    calibration = os.path.join(work, "calibration")
    os.makedirs(calibration)
    shutil.copyfile(os.path.join(args.data, demo.MNI), os.path.join(calibration, "mni152_0000.nii.gz"))
    env = {**os.environ, "TRTSEG_CACHE": os.path.join(work, "cache")}
    out: dict = {"scenario": "demo_precision", "machine": machine(), "device": args.device,
                 "model": os.path.relpath(demo.MODEL_FOLDER), "cases": [c.case_id for c in cases],
                 "calibration": "MNI152 2009a T1 template (mni152)", "calibration_method": args.calibration_method,
                 "runs": {}}
    masks: dict[str, dict[str, np.ndarray]] = {}
    for precision in args.precisions:
        dest = os.path.join(work, precision)
        cmd = [sys.executable, "-m", "trtseg.cli", "predict", "-i", os.path.join(work, "images"), "-o", dest,
               "-m", demo.MODEL_FOLDER, "--single-process", "--engine", "torch", "--device", args.device,
               "--precision", precision, "--no-progress"]
        if precision in ("fp8", "int8"):
            cmd += ["--calibration", calibration, "--calibration-method", args.calibration_method]
        t = time.perf_counter()
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        run: dict = {"command": " ".join(["trtseg", *cmd[3:]]).replace(work, "WORK"), "exit": p.returncode,
                     "seconds": round(time.perf_counter() - t, 2)}
        if p.returncode != 0 and precision in ("fp8", "int8"):
            # refused by the gate: the same calibration (from the engine cache) without the gate, to see how far off
            run["refused"] = p.stderr.strip().splitlines()[-1].replace(work, "WORK") if p.stderr else None
            p = subprocess.run(cmd + ["--max-dice-drop", "1"], env=env, capture_output=True, text=True)
            run["scored_with"] = "--max-dice-drop 1"
        if p.returncode != 0:
            run["error"] = p.stderr.strip().splitlines()[-1:] if p.stderr else None
        else:
            report = json.load(open(os.path.join(dest, "run_report.json")))
            cal = (report.get("engine") or {}).get("calibration")
            if cal:
                run["calibration"] = {k: cal.get(k) for k in ("method", "cases", "gate", "accuracy_vs_fp32")}
            masks[precision] = {}
            run["dice_vs_reference"] = {}
            for c in cases:
                got = np.asarray(nib.load(os.path.join(dest, f"{c.case_id}.nii.gz")).dataobj)
                ref = np.asarray(nib.load(os.path.join(work, "reference", f"{c.case_id}.nii.gz")).dataobj)
                masks[precision][c.case_id] = got
                run["dice_vs_reference"][c.case_id] = round(dice_per_label(got > 0, ref > 0, [True])["True"], 5)
            if "fp32" in masks and precision != "fp32":
                run["vs_fp32"] = {c.case_id: {
                    "voxel_agreement": round(float((masks["fp32"][c.case_id] == masks[precision][c.case_id]).mean()), 6),
                    "dice_minus_fp32": round(run["dice_vs_reference"][c.case_id] -
                                             out["runs"]["fp32"]["dice_vs_reference"][c.case_id], 5)}
                    for c in cases}
        out["runs"][precision] = run
        save(out, args.json)


if __name__ == "__main__":
    main()
