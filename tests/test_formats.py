"""Inputs as they come: NRRD and MetaImage beside NIfTI, and the clear errors of inputs trtseg cannot use."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from trtseg.cli import main

from conftest import write_case


def _sitk_case(folder, name, ending, seed=3):
    import SimpleITK as sitk
    from trtseg import synthetic as syn
    os.makedirs(folder, exist_ok=True)
    img = sitk.GetImageFromArray(syn.ct_like_volume((30, 28, 12), seed=seed).astype(np.int16).transpose(2, 1, 0))
    img.SetSpacing((1.0, 1.0, 2.0))
    img.SetOrigin((5.0, -7.5, 3.0))
    sitk.WriteImage(img, os.path.join(folder, name + ending), True)


def test_a_rerun_skips_nrrd_and_mhd_masks_by_their_stamp(small_model, tmp_path):
    inp = str(tmp_path / "in")
    _sitk_case(inp, "a_0000", ".nrrd")
    _sitk_case(inp, "b_0000", ".mhd", seed=4)  # MetaImage with a separate .zraw data file
    args = ["predict", "-i", inp, "-o", str(tmp_path / "out"), "-m", small_model, "-f", "0", "--disable-tta",
            "--single-process", "--no-progress"]
    assert main(args) == 0
    assert sorted(os.listdir(tmp_path / "out")) == [".trtseg", "a.nrrd", "b.mhd", "b.zraw", "run_report.json"]
    assert main(args) == 0
    report = json.load(open(tmp_path / "out" / "run_report.json"))
    assert [c["status"] for c in report["cases"]] == ["skipped", "skipped"]
    # QC pictures read NRRD/MetaImage images and masks with the same reader as NIfTI
    assert main(["qc", "-i", inp, "-o", str(tmp_path / "out")]) == 0
    assert all(os.path.getsize(tmp_path / "out" / "qc" / f"{c}.png") > 1000 for c in ("a", "b"))


def test_a_folder_with_no_readable_case_names_what_it_found(small_model, tmp_path, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    for n in ("a.png", "b.png", "c.png", "notes.txt"):
        (inp / n).write_bytes(b"x")
    args = ["predict", "-i", str(inp), "-o", str(tmp_path / "out"), "-m", small_model, "--single-process"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "3 file(s) ending .png, 1 file(s) ending .txt" in err[0] and ".nrrd" in err[0], err
    assert not os.path.exists(tmp_path / "out" / "run_report.json")
    assert main([*args, "--allow-empty"]) == 0  # said on purpose: a run of 0 cases
    assert json.load(open(tmp_path / "out" / "run_report.json"))["summary"]["total"] == 0


def test_unreadable_image_and_two_inputs_for_one_case_fail_with_one_line(small_model, tmp_path):
    inp = str(tmp_path / "in")
    write_case(inp, "good", (30, 28, 12), (1.0, 1.0, 2.0), seed=5)
    with open(os.path.join(inp, "bad_0000.nrrd"), "wb") as f:
        f.write(b"NRRD0004\ntype: what\n\n")
    write_case(inp, "twice", (30, 28, 12), (1.0, 1.0, 2.0), seed=6)
    os.rename(os.path.join(inp, "twice_0000.nii.gz"), os.path.join(inp, "twice_0000.nii"))  # not gzip: nibabel
    write_case(inp, "twice", (30, 28, 12), (1.0, 1.0, 2.0), seed=7)  # reads it by name, so this is a clash only
    out = str(tmp_path / "out")
    assert main(["predict", "-i", inp, "-o", out, "-m", small_model, "-f", "0", "--disable-tta", "--single-process",
                 "--no-progress"]) == 1
    cases = {c["case_id"]: c for c in json.load(open(os.path.join(out, "run_report.json")))["cases"]}
    assert cases["good"]["status"] == "ok"
    bad, twice = cases["bad"], cases["twice"]
    assert bad["status"] == "failed" and "bad_0000.nrrd: SimpleITK cannot read it" in bad["error"], bad
    assert twice["status"] == "failed" and "two inputs for one case" in twice["error"], twice
    assert "twice_0000.nii " in twice["error"] + " " and "twice_0000.nii.gz" in twice["error"], twice
    assert all("\n" not in c["error"] for c in (bad, twice))
    assert sorted(os.listdir(out)) == [".trtseg", "good.nii.gz", "run_report.json"]


@pytest.mark.parametrize("problem", ["mixed"])
def test_channel_files_in_two_formats_are_refused(tmp_path, problem):
    from trtseg.dataset import list_cases
    inp = str(tmp_path / "in")
    write_case(inp, "m", (20, 20, 8), (1.0, 1.0, 2.0))
    _sitk_case(inp, "m_0001", ".nrrd")
    (case,) = list_cases(inp, 2)
    assert case.problem == "channel files of one case in different formats"


def test_nnunet_addressing_resolves_the_folders_nnunet_resolves(small_model, tmp_path, monkeypatch):
    """-d/-c/-tr/-p under $nnUNet_results, by id or name, against nnunetv2's own get_output_folder; nnU-Net's
    underscore spellings of the flags are accepted."""
    import shutil
    import subprocess
    import sys

    results = tmp_path / "results"
    for trainer in ("nnUNetTrainer", "nnUNetTrainerNoMirroring"):
        shutil.copytree(small_model, results / "Dataset042_Liver" / f"{trainer}__nnUNetPlans__3d_fullres")
    monkeypatch.setenv("nnUNet_results", str(results))
    ref = subprocess.run([sys.executable, "-c", "from nnunetv2.utilities.file_path_utilities import get_output_folder;"
                          "print(get_output_folder('42', 'nnUNetTrainerNoMirroring', 'nnUNetPlans', '3d_fullres'))"],
                         capture_output=True, text=True, env={**os.environ, "nnUNet_results": str(results)})
    assert ref.returncode == 0, ref.stderr
    from trtseg.nnunet_paths import model_folder
    assert model_folder("42", "3d_fullres", "nnUNetTrainerNoMirroring") == ref.stdout.strip()
    assert model_folder("Dataset042_Liver", "3d_fullres") == str(results / "Dataset042_Liver" /
                                                                  "nnUNetTrainer__nnUNetPlans__3d_fullres")
    inp = str(tmp_path / "in")
    write_case(inp, "c", (30, 28, 12), (1.0, 1.0, 2.0), seed=8)
    out = str(tmp_path / "out")
    assert main(["predict", "-i", inp, "-o", out, "-d", "42", "-c", "3d_fullres", "-f", "0", "-chk",
                 "checkpoint_final.pth", "-step_size", "0.5", "--disable_tta", "--save_probabilities",
                 "--single-process", "--no-progress"]) == 0
    report = json.load(open(os.path.join(out, "run_report.json")))
    assert report["model"]["source"].endswith("Dataset042_Liver/nnUNetTrainer__nnUNetPlans__3d_fullres")
    assert report["settings"]["window"]["use_mirroring"] is False and os.path.exists(os.path.join(out, "c.npz"))
    assert main(["predict", "-i", inp, "-o", out, "-d", "7", "-c", "3d_fullres", "--single-process"]) == 2
