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
