"""nnU-Net v1 model folders: trtseg's masks against nnU-Net v1's own predictor (the `nnunet` 1.7.1 package, a
test-only reference), the v1 network as a project module, and export / build / predict on a v1 folder."""
from __future__ import annotations

import importlib.util
import json
import os
import pickle
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from trtseg import synthetic as syn
from trtseg.cli import main
from trtseg.errors import ModelFolderError
from trtseg.model_folder import load_model_folder

from conftest import voxel_agreement, write_case

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

V1_MODELS = {
    # CT normalization, two folds, anisotropic target spacing (separate z in preprocessing and export)
    "ct_2folds": dict(folds=(0, 1), normalization=("CT",), spacing=(2.0, 1.0, 1.0)),
    # 'nonCT' z-score with the nonzero mask (v1 resamples before it normalizes), a transposed axis order, 3 labels
    "mr_mask_transposed": dict(folds=(0,), normalization=("nonCT",), use_mask_for_norm=(True,), num_classes=3,
                               transpose_forward=(2, 0, 1), spacing=(1.0, 1.0, 1.5), patch_size=(32, 24, 40),
                               pool_op_kernel_sizes=((2, 2, 2), (2, 2, 2)),
                               conv_kernel_sizes=((3, 3, 3), (3, 3, 3), (3, 3, 3)), seed=7),
    # two modalities (CT + nonCT without mask), isotropic
    "two_modalities": dict(folds=(0,), normalization=("CT", "nonCT"), use_mask_for_norm=(False, False),
                           spacing=(1.2, 1.2, 1.2), patch_size=(24, 24, 24), pool_op_kernel_sizes=((2, 2, 2), (2, 2, 2)),
                           conv_kernel_sizes=((3, 3, 3), (3, 3, 3), (3, 3, 3)), seed=3),
}


@pytest.fixture(scope="module")
def v1_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("v1_models")
    return {name: syn.make_v1_model_folder(str(root / name / "nnUNetTrainerV2__nnUNetPlansv2.1"), **kw)
            for name, kw in V1_MODELS.items()}


def nnunet_v1_predict(model_dir: str, cases: list[list[str]], out_dir: str, folds, do_tta: bool = True) -> list[str]:
    """nnU-Net v1's own predict_cases on the CPU (fp32), one preprocessing and one export process."""
    from nnunet.inference.predict import predict_cases
    outs = [os.path.join(out_dir, os.path.basename(c[0]).replace("_0000.nii.gz", ".nii.gz")) for c in cases]
    predict_cases(model_dir, cases, outs, tuple(int(f) for f in folds), save_npz=False, num_threads_preprocessing=1,
                  num_threads_nifti_save=1, segs_from_prev_stage=None, do_tta=do_tta, mixed_precision=False,
                  overwrite_existing=True, all_in_gpu=False, step_size=0.5, checkpoint_name="model_final_checkpoint")
    return outs


needs_nnunet_v1 = pytest.mark.skipif(importlib.util.find_spec("nnunet") is None,
                                     reason="the nnunet (v1) package is not installed (it is in the test extra)")


@needs_nnunet_v1
@pytest.mark.parametrize("name", sorted(V1_MODELS))
def test_v1_masks_match_nnunet_v1s_own_predictor(name, v1_models, tmp_path):
    kw = V1_MODELS[name]
    inp = str(tmp_path / "in")
    cases = [write_case(inp, "aniso", (70, 61, 23), (0.8, 0.8, 3.1), oblique_deg=20, zero_border=3,
                        channels=len(kw["normalization"])),
             write_case(inp, "iso", (48, 40, 44), (1.1, 1.1, 1.1), seed=9, channels=len(kw["normalization"]))]
    refs = nnunet_v1_predict(v1_models[name], cases, str(tmp_path / "ref"), kw["folds"])
    assert main(["predict", "-i", inp, "-o", str(tmp_path / "trtseg"), "-m", v1_models[name], "--single-process"]) == 0
    for ref in refs:
        ours = str(tmp_path / "trtseg" / os.path.basename(ref))
        labels = np.unique(np.asarray(nib.load(ours).dataobj))
        assert len(labels) >= 2, f"{name}: a constant mask says nothing ({labels})"
        agreement = voxel_agreement(ref, ours)
        print(name, os.path.basename(ref), agreement)
        assert agreement >= 0.999, (name, ref, agreement)


def test_v1_folder_loads_without_the_nnunet_package(v1_models, tmp_path):
    """The v1 network is trtseg's own: a predict in a process where `import nnunet` fails still runs."""
    inp = str(tmp_path / "in")
    write_case(inp, "c", (40, 36, 12), (0.9, 0.9, 3.0))
    code = ("import sys; sys.modules['nnunet'] = None\n"
            "from trtseg.cli import main\n"
            f"sys.exit(main(['predict', '-i', {inp!r}, '-o', {str(tmp_path / 'out')!r}, '-m', "
            f"{v1_models['ct_2folds']!r}, '--single-process']))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert os.path.exists(tmp_path / "out" / "c.nii.gz")
    model = load_model_folder(v1_models["ct_2folds"])
    assert model.nnunet_version == 1 and model.folds == ["0", "1"] and model.mirror_axes == (0, 1, 2)
    assert type(model.build_network("0")).__module__ == "trtseg.generic_unet"


def test_v1_folder_through_export_ray_job_and_tensorrt_builder(v1_models, tmp_path, monkeypatch):
    folder = v1_models["mr_mask_transposed"]
    onnx = str(tmp_path / "v1.onnx")
    assert main(["export", "-m", folder, "-o", onnx, "--dynamic-batch"]) == 0
    report = json.load(open(onnx + ".report.json"))
    assert report["vs_pytorch_fp32"]["random"]["argmax_agreement"] > 0.9999
    inp = str(tmp_path / "in")
    write_case(inp, "a", (60, 52, 21), (0.8, 0.8, 3.0), oblique_deg=15, seed=3, zero_border=2)
    write_case(inp, "b", (50, 44, 30), (1.0, 1.0, 1.5), seed=4)
    assert main(["predict", "-i", inp, "-o", str(tmp_path / "one"), "-m", folder, "--single-process"]) == 0
    assert main(["predict", "-i", inp, "-o", str(tmp_path / "ray"), "-m", folder, "--cpu-actors", "2",
                 "--partials", "fp32", "--no-progress"]) == 0  # the Ray job, ONNX Runtime engine
    for case in ("a", "b"):
        assert voxel_agreement(str(tmp_path / "one" / f"{case}.nii.gz"), str(tmp_path / "ray" / f"{case}.nii.gz")) >= 0.9999
    # reduced precision with accuracy reports on the real volumes (INT8 calibrated on them). Random weights leave
    # many near-ties between labels, which INT8 flips, so only FP16 is gated here
    for precision, gate in (("fp16", ["--max-dice-drop", "0.5"]), ("int8", [])):
        out = str(tmp_path / f"v1.{precision}.onnx")
        assert main(["export", "-m", folder, "-o", out, "--precision", precision, "--dynamic-batch",
                     "--calibration", inp, *gate]) == 0
        acc = json.load(open(out + ".report.json"))["accuracy_vs_fp32"]
        assert {c["case"] for c in acc["cases"]} == {"a", "b"} and set(acc["mean_dice_vs_fp32"]) == {"1", "2", "3"}
    if importlib.util.find_spec("tensorrt_rtx") is None:
        pytest.skip("tensorrt-rtx wheels not installed (they are in the test extra)")
    monkeypatch.setenv("TRTSEG_TENSORRT_MODULE", "tensorrt_rtx")
    import trtseg.accel.trt_api as api
    monkeypatch.setattr(api, "_loaded", None)
    assert main(["build", "--onnx", onnx, "--engine-cache", str(tmp_path / "cache"), "--target-cc", "SM89",
                 "--optimization-level", "0", "--max-batch", "2", "--opt-batch", "2"]) == 0
    engines = [f for _, _, fs in os.walk(tmp_path / "cache" / "engines") for f in fs if f.endswith(".engine")]
    assert len(engines) == 1


def test_broken_v1_folders_fail_clearly(v1_models, tmp_path):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(v1_models["ct_2folds"], broken)
    (broken / "fold_1" / "model_final_checkpoint.model.pkl").write_bytes(b"not a pickle")
    with pytest.raises(ModelFolderError, match=r"fold_1/model_final_checkpoint.model.pkl: cannot unpickle"):
        load_model_folder(str(broken))
    with pytest.raises(ModelFolderError, match="no fold_N/model_best.model"):
        load_model_folder(str(broken), checkpoint_name="model_best")
    info = pickle.load(open(broken / "fold_0" / "model_final_checkpoint.model.pkl", "rb"))
    info["plans"]["normalization_schemes"] = {0: "CT2"}
    pickle.dump(info, open(broken / "fold_0" / "model_final_checkpoint.model.pkl", "wb"))
    with pytest.raises(ModelFolderError, match=r"v1 normalization \['CT2'\] is not supported"):
        load_model_folder(str(broken), ["0"])
    ckpt = torch.load(broken / "fold_0" / "model_final_checkpoint.model", weights_only=False)
    ckpt["state_dict"].pop("seg_outputs.1.weight")
    info["plans"]["normalization_schemes"] = {0: "CT"}
    pickle.dump(info, open(broken / "fold_0" / "model_final_checkpoint.model.pkl", "wb"))
    torch.save(ckpt, broken / "fold_0" / "model_final_checkpoint.model")
    with pytest.raises(ModelFolderError, match="do not fit the Generic_UNet"):
        load_model_folder(str(broken), ["0"]).build_network("0")


# a v1 model planned on data whose thick axis is NIfTI x: transpose_forward [2, 0, 1] puts it first, and the target
# spacing (model order) is anisotropic; its export's separate-z axis follows v1's rule (trtseg/export.py)
TRANSPOSED_ANISO = dict(folds=(0, 1), normalization=("CT",), transpose_forward=(2, 0, 1), spacing=(4.0, 1.0, 1.0),
                        patch_size=(16, 32, 32), seed=13)


@pytest.fixture(scope="module")
def transposed_aniso_model(tmp_path_factory) -> str:
    return syn.make_v1_model_folder(str(tmp_path_factory.mktemp("v1_t") / "nnUNetTrainerV2__nnUNetPlansv2.1"),
                                    **TRANSPOSED_ANISO)


@pytest.fixture(scope="module")
def transposed_aniso_cases(tmp_path_factory) -> tuple[str, list[list[str]]]:
    inp = str(tmp_path_factory.mktemp("v1_t_in"))
    # not anisotropic (v1 takes the export's axis from the plans' spacing, in the transposed order), and anisotropic
    cases = [write_case(inp, "iso", (40, 36, 30), (1.3, 1.3, 1.6), oblique_deg=10, seed=21),
             write_case(inp, "aniso", (20, 44, 40), (3.5, 0.9, 0.9), seed=22, zero_border=2)]
    return inp, cases


@needs_nnunet_v1
@pytest.mark.parametrize("folds,tta", [("0", True), ("0", False), ("0 1", True), ("0 1", False)])
def test_v1_transposed_plans_export_like_v1(folds, tta, transposed_aniso_model, transposed_aniso_cases, tmp_path):
    inp, cases = transposed_aniso_cases
    fold_list = folds.split()
    refs = nnunet_v1_predict(transposed_aniso_model, cases, str(tmp_path / "ref"), fold_list, do_tta=tta)
    args = ["predict", "-i", inp, "-m", transposed_aniso_model, "-f", *fold_list, "--no-progress",
            *([] if tta else ["--disable-tta"])]
    assert main([*args, "-o", str(tmp_path / "single"), "--single-process"]) == 0
    paths = ["single"]
    if folds == "0 1" and tta:  # the Ray job gives these masks too
        assert main([*args, "-o", str(tmp_path / "ray"), "--cpu-actors", "2", "--partials", "fp32"]) == 0
        paths.append("ray")
    for ref in refs:
        for path in paths:
            ours = str(tmp_path / path / os.path.basename(ref))
            assert len(np.unique(np.asarray(nib.load(ours).dataobj))) >= 2
            agreement = voxel_agreement(ref, ours)
            print(folds, tta, path, os.path.basename(ref), agreement)
            assert agreement >= 0.999, (path, ref, agreement)
            a, b = nib.load(ref), nib.load(ours)
            np.testing.assert_allclose(b.affine, a.affine, atol=1e-5)


@needs_nnunet_v1
def test_v1_postprocessing_json_applies_by_default(v1_models, tmp_path):
    """A v1 folder's postprocessing.json (connected components per class, min_valid_object_sizes) applies by
    default, as v1's predict_cases does; --disable-postprocessing gives v1's disable_postprocessing=True masks."""
    import shutil

    from nnunet.inference.predict import predict_cases

    folder = str(tmp_path / "model" / "nnUNetTrainerV2__nnUNetPlansv2.1")
    shutil.copytree(v1_models["mr_mask_transposed"], folder)
    with open(os.path.join(folder, "postprocessing.json"), "w") as f:
        json.dump({"for_which_classes": [1, [2, 3]], "min_valid_object_sizes": "{1: 40.0, (2, 3): 10.0}"}, f)
    inp = str(tmp_path / "in")
    cases = [write_case(inp, "a", (56, 50, 30), (0.9, 0.9, 1.8), oblique_deg=9, seed=5)]
    out = {}
    for disable in (False, True):
        ref = str(tmp_path / f"ref_{disable}" / "a.nii.gz")
        os.makedirs(os.path.dirname(ref))
        predict_cases(folder, cases, [ref], (0,), save_npz=False, num_threads_preprocessing=1,
                      num_threads_nifti_save=1, do_tta=False, mixed_precision=False, overwrite_existing=True,
                      disable_postprocessing=disable)
        flags = ["--disable-postprocessing"] if disable else []
        for path, extra in (("single", ["--single-process"]), ("ray", ["--cpu-actors", "1"])):
            o = str(tmp_path / f"{path}_{disable}")
            assert main(["predict", "-i", inp, "-o", o, "-m", folder, "--disable-tta", "--no-progress", *extra,
                         *flags]) == 0
            agreement = voxel_agreement(ref, os.path.join(o, "a.nii.gz"))
            print(path, "disable" if disable else "default", agreement)
            assert agreement >= 0.999, (path, disable, agreement)
            report = json.load(open(os.path.join(o, "run_report.json")))
            pp = report["cases"][0]["postprocessing"]
            assert (pp is None) if disable else (pp["kind"] == "nnunetv1" and pp["removed_voxels"] > 0), pp
        out[disable] = np.asarray(nib.load(ref).dataobj)
    assert (out[False] != out[True]).sum() > 0, "the postprocessing must remove voxels, or the test shows nothing"
