"""A CT as a DICOM series against the same CT as NIfTI, through whole `trtseg predict` processes, default flags:

    python -m benchmarks.dicom_vs_nifti [--shape 512 512 240] [--json F]

The series is written as a scanner writes one (trtseg.synthetic.save_dicom_series: one int16 file per slice with
rescale slope and intercept, shuffled file names); the NIfTI is SimpleITK's conversion of that series, the route
nnU-Net users take. Runs, each a whole process without mirroring (as benchmarks/predict_vs_nnunet.py):

1. the NIfTI, first: it fills the engine cache where that is empty (reported, not compared);
2. the NIfTI, warm;
3. the DICOM series, warm.

The engine cache is $TRTSEG_CACHE where set (a cache another benchmark filled makes the first run warm too), else
a new folder.

Reported: each run's wall seconds and the run report's stage seconds; whether the two routes' inputs, as trtseg
reads them, are equal; the masks' voxel agreement and affines; and the agreement of two NIfTI runs (the GPU's
run-to-run variation: compiled fp16 kernels need not give the same bits in two processes). Model: nnU-Net's 3d_fullres CT topology (32->320), seeded random weights.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import nibabel as nib
import numpy as np

from benchmarks.case_latency import make_fullres_model
from benchmarks.common import machine, save
from trtseg import synthetic as syn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", nargs=3, type=int, default=[512, 512, 240], help="x y z")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import SimpleITK as sitk

    work = tempfile.mkdtemp(prefix="trtseg_dicom_")
    model = make_fullres_model(os.path.join(work, "m"))
    t = time.perf_counter()
    hu_zyx = syn.ct_like_volume(args.shape, seed=100).transpose(2, 1, 0)
    series = os.path.join(work, "dicom", "ct000")
    syn.save_dicom_series(series, hu_zyx, (1.25, 0.7, 0.7), origin=(-180.0, -180.0, -150.0))
    write_seconds = round(time.perf_counter() - t, 1)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(series))
    os.makedirs(os.path.join(work, "nifti"))
    sitk.WriteImage(reader.Execute(), os.path.join(work, "nifti", "ct000_0000.nii.gz"))
    out: dict = {"scenario": "dicom_vs_nifti", "machine": machine(), "shape_xyz": args.shape, "mirroring": False,
                 "series_files": len(os.listdir(series)), "series_write_seconds": write_seconds,
                 "command": "trtseg predict -i IN -o OUT -m MODEL --disable-tta --no-progress", "runs": {}}
    env = {**os.environ, "TRTSEG_CACHE": os.environ.get("TRTSEG_CACHE") or os.path.join(work, "cache")}
    for name, folder in (("nifti_first", "nifti"), ("nifti_warm_cache", "nifti"),
                         ("dicom_warm_cache", "dicom")):
        dest = os.path.join(work, name)
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "trtseg.cli", "predict", "-i", os.path.join(work, folder), "-o",
                            dest, "-m", model, "--disable-tta", "--no-progress"], env=env, capture_output=True,
                           text=True)
        entry: dict = {"seconds": round(time.perf_counter() - t0, 2), "exit": r.returncode}
        if r.returncode == 0:
            rep = json.load(open(os.path.join(dest, "run_report.json")))
            entry.update(startup_seconds=rep["summary"].get("startup_seconds"),
                         case_seconds=rep["cases"][0].get("seconds"),
                         compile_cache=(rep.get("engine") or {}).get("compile_cache"))
        else:
            entry["error"] = (r.stdout + r.stderr)[-3000:]
        out["runs"][name] = entry
        save(out, args.json)
    # the two routes' inputs as trtseg reads them: equal voxels and spacing mean any mask difference is the GPU's
    # run-to-run variation, which nifti_first against nifti_warm_cache measures
    from trtseg.read import read_case

    dicom_in = read_case(sorted(os.path.join(series, n) for n in os.listdir(series)))
    nifti_in = read_case([os.path.join(work, "nifti", "ct000_0000.nii.gz")])
    out["inputs_equal"] = bool(np.array_equal(dicom_in.data, nifti_in.data) and
                               np.allclose(dicom_in.spacing_zyx, nifti_in.spacing_zyx))
    masks = {k: nib.load(os.path.join(work, k, "ct000.nii.gz")) for k, v in out["runs"].items() if v["exit"] == 0}
    if {"nifti_warm_cache", "dicom_warm_cache"} <= set(masks):
        a, b = masks["nifti_warm_cache"], masks["dicom_warm_cache"]
        out["masks_equal"] = bool(np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj)))
        out["agreement_dicom_vs_nifti"] = round(float((np.asarray(a.dataobj) == np.asarray(b.dataobj)).mean()), 6)
        out["affines_equal"] = bool(np.allclose(a.affine, b.affine, atol=1e-5))
        if "nifti_first" in masks:
            out["agreement_nifti_run_to_run"] = round(float(
                (np.asarray(masks["nifti_first"].dataobj) == np.asarray(a.dataobj)).mean()), 6)
        out["dicom_over_nifti"] = round(out["runs"]["dicom_warm_cache"]["seconds"] /
                                        out["runs"]["nifti_warm_cache"]["seconds"], 2)
    save(out, args.json)


if __name__ == "__main__":
    main()
