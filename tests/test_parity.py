"""trtseg's masks against nnunetv2's own nnUNetPredictor, on the same model folders and files.

The bar: at least 99.9 % voxel agreement per case, and the input's geometry exactly (affine, qform/sform codes).
"""
from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest

from trtseg import synthetic as syn
from trtseg.dataset import list_cases
from trtseg.model_folder import load_model_folder
from trtseg.options import EngineSpec, Settings, WindowOptions
from trtseg.predict import Predictor

from conftest import nnunet_predict, voxel_agreement, write_case

BAR = 0.999
pytestmark = pytest.mark.usefixtures("ray_local")  # every comparison runs the Ray job too


def run_trtseg(model_dir, in_dir, out_dir, folds, use_mirroring=True):
    """Both paths: the single process (Predictor) into out_dir, and the Ray job (one CPU actor) into out_dir_ray."""
    from trtseg.jobs.config import JobConfig
    from trtseg.jobs.driver import run_job

    model = load_model_folder(model_dir, folds)
    settings = Settings(window=WindowOptions(use_mirroring=use_mirroring), engine=EngineSpec(device="cpu"))
    pred = Predictor(model, settings)
    results = [pred.predict_case(c, out_dir) for c in list_cases(in_dir, model.num_input_channels)]
    assert all(r.status == "ok" for r in results), [r.error for r in results]
    report = run_job(JobConfig(input=in_dir, output=out_dir + "_ray", model=model_dir, folds=folds,
                               settings=settings, cpu_actors=1, progress=False))
    assert report["summary"]["ok"] == len(results), report["cases"]
    return results


def assert_same_geometry(input_file: str, output_file: str) -> None:
    a, b = nib.load(input_file), nib.load(output_file)
    assert a.shape[:3] == b.shape
    np.testing.assert_allclose(b.affine, a.affine, atol=1e-6)
    np.testing.assert_allclose(b.get_qform(), a.get_qform(), atol=1e-6)
    np.testing.assert_allclose(b.get_sform(), a.get_sform(), atol=1e-6)
    assert int(b.header["qform_code"]) == int(a.header["qform_code"])
    assert int(b.header["sform_code"]) == int(a.header["sform_code"])
    assert b.get_data_dtype() == np.uint8


def both_paths_agree(common: list[str], tmp_path, case: str, ref: str, label: str, input_file: str) -> dict:
    """Runs `trtseg predict` (``common`` without -o) in one process and as the Ray job (one CPU actor); each mask
    agrees with nnU-Net's ``ref`` at the bar with the input's geometry. Returns path -> its report entry."""
    from trtseg.cli import main
    assert main([*common, "-o", str(tmp_path / "single"), "--single-process"]) == 0
    assert main([*common, "-o", str(tmp_path / "ray"), "--cpu-actors", "1"]) == 0
    entries = {}
    for path in ("single", "ray"):
        ours = str(tmp_path / path / f"{case}.nii.gz")
        agreement = voxel_agreement(ref, ours)
        print(label, path, agreement)
        assert agreement >= BAR, (path, agreement)
        assert_same_geometry(input_file, ours)
        entries[path] = json.load(open(tmp_path / path / "run_report.json"))["cases"][0]
    return entries


def compare(model_dir, cases, tmp, folds, use_mirroring=True, min_labels=2):
    in_dir = os.path.dirname(cases[0][0])
    refs = nnunet_predict(model_dir, cases, os.path.join(tmp, "ref"), folds, use_mirroring)
    run_trtseg(model_dir, in_dir, os.path.join(tmp, "ours"), [str(f) for f in folds], use_mirroring)
    for files, ref in zip(cases, refs):
        ours = os.path.join(tmp, "ours", os.path.basename(ref))
        ray = os.path.join(tmp, "ours_ray", os.path.basename(ref))
        for path in (ours, ray):
            agreement = voxel_agreement(ref, path)
            assert agreement >= BAR, f"{path}: {agreement:.5f} voxel agreement with nnU-Net"
            assert_same_geometry(files[0], path)
        assert voxel_agreement(ours, ray) == 1.0, f"{ray}: the Ray job's mask differs from the single process's"
        present = np.unique(np.asarray(nib.load(ref).dataobj))
        assert len(present) >= min_labels, f"reference mask has labels {present}: the comparison would be vacuous"


def test_anisotropic_oblique_zero_borders_mirroring_one_fold(small_model, tmp_path):
    cases = [write_case(str(tmp_path / "in"), "aniso", (70, 61, 23), (0.8, 0.8, 3.1), oblique_deg=20, zero_border=3),
             write_case(str(tmp_path / "in"), "iso", (45, 50, 52), (1.1, 1.1, 1.4), oblique_deg=-35, seed=3)]
    compare(small_model, cases, str(tmp_path), folds=[0], use_mirroring=True, min_labels=3)


def test_smaller_than_patch_two_folds_no_mirroring(small_model, tmp_path):
    cases = [write_case(str(tmp_path / "in"), "tiny", (21, 17, 9), (1.0, 1.0, 2.0), oblique_deg=5, seed=5)]
    compare(small_model, cases, str(tmp_path), folds=[0, 1], use_mirroring=False)


def test_residual_encoder_transposed_plans(tmp_path):
    model = syn.make_model_folder(str(tmp_path / "model"), folds=(0,), arch="ResidualEncoderUNet",
                                  patch_size=(32, 24, 32), spacing=(1.0, 1.5, 1.0), features=(4, 8, 16),
                                  transpose_forward=(1, 0, 2), seed=11)
    cases = [write_case(str(tmp_path / "in"), "res", (50, 40, 33), (1.2, 0.9, 1.6), oblique_deg=12, seed=7)]
    compare(model, cases, str(tmp_path), folds=[0])


def test_zscore_mask_for_norm_two_channels_torch_resampling_inherited_config(tmp_path):
    ds = syn.dataset_dict(num_channels=2, num_labels=4)
    model = syn.make_model_folder(str(tmp_path / "model"), folds=(0,), patch_size=(16, 32, 32),
                                  spacing=(3.0, 1.0, 1.0), features=(4, 8, 16),
                                  normalization=("ZScoreNormalization", "ZScoreNormalization"),
                                  use_mask_for_norm=(True, False), resampling="torch",
                                  configuration="3d_custom", inherit=True, dataset_json=ds, seed=21)
    cases = [write_case(str(tmp_path / "in"), "mr", (48, 44, 30), (0.9, 0.9, 2.2), oblique_deg=30, seed=9,
                        zero_border=4, channels=2)]
    compare(model, cases, str(tmp_path), folds=[0])


def test_region_based_model(tmp_path):
    ds = syn.dataset_dict(regions=True)
    model = syn.make_model_folder(str(tmp_path / "model"), folds=(0,), patch_size=(24, 24, 24),
                                  spacing=(1.5, 1.5, 1.5), features=(4, 8, 16), dataset_json=ds, seed=31,
                                  logit_scale=3.0)
    cases = [write_case(str(tmp_path / "in"), "reg", (40, 36, 30), (1.0, 1.0, 1.0), seed=2)]
    compare(model, cases, str(tmp_path), folds=[0])


def test_save_probabilities_like_nnunet_on_both_paths(small_model, tmp_path):
    """--save-probabilities writes nnU-Net's CASE.npz ('probabilities', float32, (k, z, y, x)) and CASE.pkl, from
    the single process and from the Ray job (two actors, fp32 partials), close to nnunetv2's own."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    import torch

    from trtseg.cli import main

    files = write_case(str(tmp_path / "in"), "prob", (40, 38, 15), (0.9, 0.9, 2.5), oblique_deg=8, seed=12)
    p = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    p.initialize_from_trained_model_folder(small_model, use_folds=(0,))
    os.makedirs(tmp_path / "ref", exist_ok=True)
    p.predict_from_files_sequential([files], [str(tmp_path / "ref" / "prob")], save_probabilities=True, overwrite=True)
    common = ["predict", "-i", str(tmp_path / "in"), "-m", small_model, "-f", "0", "--disable-tta",
              "--save-probabilities", "--no-progress", "--tiles-per-task", "2"]
    assert main([*common, "-o", str(tmp_path / "single"), "--single-process"]) == 0
    assert main([*common, "-o", str(tmp_path / "ray"), "--cpu-actors", "2", "--partials", "fp32"]) == 0
    ref = np.load(tmp_path / "ref" / "prob.npz")["probabilities"]
    for path in ("single", "ray"):
        ours = np.load(tmp_path / path / "prob.npz")["probabilities"]
        assert ours.shape == ref.shape and ours.dtype == np.float32, (path, ours.shape, ours.dtype)
        # nnU-Net's come from float16 sums of weighted logits (resolution ~2 at sums of ~3000): close, not equal
        diff = np.abs(ours - ref)
        print(f"{path}: probabilities vs nnunetv2 max abs {diff.max():.2e}, mean {diff.mean():.2e}")
        assert diff.mean() < 1e-3 and diff.max() < 0.1, (path, diff.mean(), diff.max())
        assert (ours.argmax(0) == ref.argmax(0)).mean() >= BAR, path
        assert os.path.exists(tmp_path / path / "prob.pkl"), path
    single, ray = (np.load(tmp_path / d / "prob.npz")["probabilities"] for d in ("single", "ray"))
    np.testing.assert_allclose(ray, single, atol=1e-5)


@pytest.fixture(scope="module")
def model_2d(tmp_path_factory) -> str:
    """A 2d configuration (Conv2d, patch and spacing (y, x)), two folds, mirroring over the two in-plane axes."""
    return syn.make_model_folder(str(tmp_path_factory.mktemp("model_2d")), folds=(0, 1), patch_size=(32, 40),
                                 spacing=(0.9, 0.9), features=(4, 8, 16), configuration="2d", mirror_axes=(0, 1),
                                 seed=41)


@pytest.mark.parametrize("folds,mirroring", [([0], True), ([0, 1], False)])
def test_2d_model_on_an_anisotropic_volume(model_2d, tmp_path, folds, mirroring):
    """nnU-Net predicts a 2d model slice by slice (2-D tiles, Gaussian and mirroring), keeping the slice spacing."""
    cases = [write_case(str(tmp_path / "in"), "slices", (60, 52, 11), (0.8, 0.8, 3.5), oblique_deg=15, seed=43,
                        zero_border=2)]
    compare(model_2d, cases, str(tmp_path), folds=folds, use_mirroring=mirroring, min_labels=3)


def _write_sitk_case(folder: str, case_id: str, ending: str, shape_xyz, spacing_xyz, seed: int) -> list[str]:
    """A CT-like int16 volume in NRRD or MetaImage with an oblique direction and a non-zero origin."""
    import SimpleITK as sitk
    os.makedirs(folder, exist_ok=True)
    vol = syn.ct_like_volume(shape_xyz, seed=seed).astype(np.int16)
    img = sitk.GetImageFromArray(vol.transpose(2, 1, 0))  # SimpleITK's array is (z, y, x)
    img.SetSpacing(spacing_xyz)
    img.SetOrigin((-31.5, 12.25, 88.0))
    a = np.deg2rad(17)
    img.SetDirection((np.cos(a), -np.sin(a), 0.0, np.sin(a), np.cos(a), 0.0, 0.0, 0.0, 1.0))
    path = os.path.join(folder, f"{case_id}_0000{ending}")
    sitk.WriteImage(img, path, True)
    return [path]


@pytest.mark.parametrize("ending", [".nrrd", ".mha"])
def test_nrrd_and_mha_inputs_give_nnunets_masks_in_the_same_format(small_model, tmp_path, ending):
    import shutil

    import SimpleITK as sitk

    model_dir = str(tmp_path / "model")
    shutil.copytree(small_model, model_dir)  # the same model, told its images end in `ending`
    ds = json.load(open(os.path.join(model_dir, "dataset.json")))
    json.dump({**ds, "file_ending": ending}, open(os.path.join(model_dir, "dataset.json"), "w"))
    cases = [_write_sitk_case(str(tmp_path / "in"), "obl", ending, (64, 56, 20), (0.85, 0.85, 2.6), seed=51)]
    refs = nnunet_predict(model_dir, cases, str(tmp_path / "ref"), [0], use_mirroring=False)
    run_trtseg(model_dir, str(tmp_path / "in"), str(tmp_path / "ours"), ["0"], use_mirroring=False)
    for ref in refs:
        a = sitk.ReadImage(ref)
        for path in (os.path.join(tmp_path, "ours", os.path.basename(ref)),
                     os.path.join(tmp_path, "ours_ray", os.path.basename(ref))):
            b = sitk.ReadImage(path)
            assert b.GetSpacing() == a.GetSpacing() and b.GetOrigin() == a.GetOrigin(), path
            assert b.GetDirection() == a.GetDirection() and b.GetSize() == a.GetSize(), path
            x, y = sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b)
            assert len(np.unique(x)) >= 2 and x.dtype == y.dtype
            agreement = float((x == y).mean())
            print(ending, path, agreement)
            assert agreement >= BAR, (path, agreement)


@pytest.fixture(scope="module")
def cascade(tmp_path_factory):
    """nnU-Net's 3d_lowres -> 3d_cascade_fullres, as its trainer leaves it under $nnUNet_results."""
    root = tmp_path_factory.mktemp("results") / "Dataset077_Cascade"
    return syn.make_cascade_folders(str(root), seed=61)


def test_cascade_with_nnunets_own_lowres_predictions(cascade, tmp_path):
    """-prev_stage_predictions given nnU-Net's own 3d_lowres output: the cascade's masks against
    nnUNetv2_predict -c 3d_cascade_fullres -prev_stage_predictions, on both paths."""
    from trtseg.cli import main

    lowres, full = cascade
    cases = [write_case(str(tmp_path / "in"), "cas", (80, 72, 30), (0.8, 0.8, 2.2), oblique_deg=11, seed=62,
                        zero_border=2)]
    low_refs = nnunet_predict(lowres, cases, str(tmp_path / "low_ref"), [0], use_mirroring=False)
    assert len(np.unique(np.asarray(nib.load(low_refs[0]).dataobj))) >= 3, "the low-res stage says nothing"
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    import torch
    p = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    p.initialize_from_trained_model_folder(full, use_folds=(0,))
    os.makedirs(tmp_path / "ref", exist_ok=True)
    p.predict_from_files_sequential(cases, [str(tmp_path / "ref" / "cas")], False, True,
                                    str(tmp_path / "low_ref"))
    ref = str(tmp_path / "ref" / "cas.nii.gz")
    common = ["predict", "-i", str(tmp_path / "in"), "-m", full, "--disable-tta", "--no-progress",
              "-prev_stage_predictions", str(tmp_path / "low_ref")]
    both_paths_agree(common, tmp_path, "cas", ref, "cascade", cases[0][0])
    # both stages in one job (-m LOWRES CASCADE, in either order) against nnU-Net's two commands: the low-res mask
    # stays on the device (single process) or crosses the object store (Ray job), and is not written. The cascade
    # carries the low-res stage's few flipped voxels (nnU-Net's float16 sums at the borders) into its input, so
    # this runs with nnU-Net's own float16 accumulation (--accumulate fp16, trtseg/aggregate.py)
    one_job = ["predict", "-i", str(tmp_path / "in"), "-m", full, lowres, "--disable-tta", "--no-progress",
               "--accumulate", "fp16"]
    for entry in both_paths_agree(one_job, tmp_path / "one_job", "cas", ref, "one-job cascade", cases[0][0]).values():
        assert entry["status"] == "ok"
    # and exactly the file route given trtseg's own low-res masks
    assert main(["predict", "-i", str(tmp_path / "in"), "-m", lowres, "-o", str(tmp_path / "low_ours"),
                 "--single-process", "--disable-tta", "--no-progress", "--accumulate", "fp16"]) == 0
    assert voxel_agreement(low_refs[0], str(tmp_path / "low_ours" / "cas.nii.gz")) >= 0.9999
    assert main([*common[:-1], str(tmp_path / "low_ours"), "-o", str(tmp_path / "file_route"), "--single-process",
                 "--accumulate", "fp16"]) == 0
    assert voxel_agreement(str(tmp_path / "file_route" / "cas.nii.gz"),
                           str(tmp_path / "one_job" / "single" / "cas.nii.gz")) == 1.0
    assert sorted(os.listdir(tmp_path / "one_job" / "single")) == [".trtseg", "cas.nii.gz", "run_report.json"]
    report = json.load(open(tmp_path / "one_job" / "ray" / "run_report.json"))
    assert [p["role"] for p in report["model"]["passes"]] == ["stage", "member"]
    # the previous stage matters: without it the run is refused, naming the model folder
    assert main(["predict", "-i", str(tmp_path / "in"), "-m", full, "-o", str(tmp_path / "no"), "--single-process"]) == 2


def test_v2_postprocessing_pkl_like_nnunetv2_apply_postprocessing(small_model, tmp_path):
    """nnUNetv2_find_best_configuration's postprocessing.pkl (the largest component of the foreground union, then
    of label 2) applied by trtseg on both paths, against nnU-Net's apply_postprocessing_to_folder on nnU-Net's own
    masks; the postprocessing must remove voxels. A file naming labels the model lacks is refused."""
    import pickle

    from nnunetv2.postprocessing.remove_connected_components import (
        apply_postprocessing_to_folder, remove_all_but_largest_component_from_segmentation)

    from trtseg.cli import main

    cases = [write_case(str(tmp_path / "in"), "pp", (70, 61, 23), (0.8, 0.8, 3.1), oblique_deg=20, seed=3,
                        zero_border=3)]
    refs = nnunet_predict(small_model, cases, str(tmp_path / "raw"), [0], use_mirroring=False)
    pp = str(tmp_path / "postprocessing.pkl")
    with open(pp, "wb") as f:
        pickle.dump(([remove_all_but_largest_component_from_segmentation] * 2,
                     [{"labels_or_regions": [1, 2]}, {"labels_or_regions": 2}]), f)
    apply_postprocessing_to_folder(str(tmp_path / "raw"), str(tmp_path / "ref"),
                                   *pickle.load(open(pp, "rb")), os.path.join(small_model, "plans.json"),
                                   os.path.join(small_model, "dataset.json"), num_processes=1)
    ref, raw = str(tmp_path / "ref" / "pp.nii.gz"), refs[0]
    assert voxel_agreement(ref, raw) < 1.0, "the postprocessing must change the masks, or the test shows nothing"
    common = ["predict", "-i", str(tmp_path / "in"), "-m", small_model, "-f", "0", "--disable-tta",
              "--no-progress", "--postprocessing", pp]
    for entry in both_paths_agree(common, tmp_path, "pp", ref, "postprocessing", cases[0][0]).values():
        assert entry["postprocessing"]["kind"] == "nnunetv2" and entry["postprocessing"]["removed_voxels"] > 0
    bad = str(tmp_path / "bad.pkl")
    with open(bad, "wb") as f:
        pickle.dump(([remove_all_but_largest_component_from_segmentation], [{"labels_or_regions": [7]}]), f)
    assert main([*common[:-1], bad, "-o", str(tmp_path / "bad"), "--single-process"]) == 2


def _nnunet_probabilities(model_dir: str, cases, out_dir: str) -> None:
    """nnUNetv2_predict --save_probabilities with fold 0, mirroring off (CASE.nii.gz, CASE.npz, CASE.pkl)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    os.makedirs(out_dir, exist_ok=True)
    p = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    p.initialize_from_trained_model_folder(model_dir, use_folds=(0,))
    p.predict_from_files_sequential(cases, [os.path.join(out_dir, "ens")], True, True, None)


def test_ensemble_with_postprocessing_like_nnunetv2_ensemble_and_apply_postprocessing(small_model, model_2d, tmp_path,
                                                                                        capsys):
    """-m 3D 2D --postprocessing: the mean of the two configurations' probabilities and the postprocessing.pkl, in
    one job, against nnUNetv2_predict --save_probabilities twice + nnUNetv2_ensemble + nnUNetv2_apply_postprocessing.
    Members whose labels differ are refused, naming the folder."""
    import pickle
    import shutil

    from nnunetv2.ensembling.ensemble import ensemble_folders
    from nnunetv2.postprocessing.remove_connected_components import (
        apply_postprocessing_to_folder, remove_all_but_largest_component_from_segmentation)

    from trtseg.cli import main

    cases = [write_case(str(tmp_path / "in"), "ens", (66, 58, 19), (0.8, 0.8, 2.9), oblique_deg=13, seed=71,
                        zero_border=2)]
    for name, model_dir in (("a", small_model), ("b", model_2d)):
        _nnunet_probabilities(model_dir, cases, str(tmp_path / name))
    ensemble_folders([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "ens"), num_processes=1)
    pp = str(tmp_path / "postprocessing.pkl")
    with open(pp, "wb") as f:
        pickle.dump(([remove_all_but_largest_component_from_segmentation] * 2,
                     [{"labels_or_regions": [1, 2]}, {"labels_or_regions": 1}]), f)
    apply_postprocessing_to_folder(str(tmp_path / "ens"), str(tmp_path / "ref"), *pickle.load(open(pp, "rb")),
                                   str(tmp_path / "a" / "plans.json"), str(tmp_path / "a" / "dataset.json"),
                                   num_processes=1)
    ref, mean = str(tmp_path / "ref" / "ens.nii.gz"), str(tmp_path / "ens" / "ens.nii.gz")
    assert voxel_agreement(ref, mean) < 1.0, "the postprocessing must change the masks, or the test shows nothing"
    for member in ("a", "b"):  # the ensemble is not one of its members
        assert voxel_agreement(mean, str(tmp_path / member / "ens.nii.gz")) < 0.99, member
    common = ["predict", "-i", str(tmp_path / "in"), "-m", small_model, model_2d, "-f", "0", "--disable-tta",
              "--no-progress", "--postprocessing", pp]
    for entry in both_paths_agree(common, tmp_path / "ours", "ens", ref, "ensemble", cases[0][0]).values():
        assert entry["postprocessing"]["removed_voxels"] > 0
    # the mean probabilities stay available, as nnUNetv2_ensemble --save_npz writes them
    assert main([*common, "-o", str(tmp_path / "probs"), "--single-process", "--save-probabilities"]) == 0
    ours = np.load(tmp_path / "probs" / "ens.npz")["probabilities"]
    theirs = (np.load(tmp_path / "a" / "ens.npz")["probabilities"] + np.load(tmp_path / "b" / "ens.npz")["probabilities"]) / 2
    assert np.abs(ours - theirs).mean() < 1e-3
    # an ensemble of models with different labels is refused before any case, naming the folder
    odd = str(tmp_path / "odd_labels")
    shutil.copytree(model_2d, odd)
    ds = json.load(open(os.path.join(odd, "dataset.json")))
    json.dump({**ds, "labels": {**ds["labels"], "extra": 3}}, open(os.path.join(odd, "dataset.json"), "w"))
    capsys.readouterr()
    assert main(["predict", "-i", str(tmp_path / "in"), "-m", small_model, odd, "-o", str(tmp_path / "no"),
                 "--single-process"]) == 2
    err = capsys.readouterr().err
    assert "odd_labels" in err and "same labels" in err and len(err.strip().splitlines()) == 1, err


def test_a_2d_image_is_refused_with_one_line_naming_the_file(model_2d, tmp_path):
    """trtseg reads volumes; a 2-D NIfTI image (no slice axis) fails its case with one line naming the file."""
    from trtseg.cli import main

    os.makedirs(tmp_path / "in")
    nib.save(nib.Nifti1Image(np.ones((40, 30), np.float32), np.eye(4)), str(tmp_path / "in" / "flat_0000.nii.gz"))
    assert main(["predict", "-i", str(tmp_path / "in"), "-m", model_2d, "-o", str(tmp_path / "out"),
                 "--single-process", "--no-progress"]) == 1
    case = json.load(open(tmp_path / "out" / "run_report.json"))["cases"][0]
    assert case["status"] == "failed" and "flat_0000.nii.gz" in case["error"] and "2-D image" in case["error"]
    assert "\n" not in case["error"] and not os.path.exists(tmp_path / "out" / "flat.nii.gz")
