"""Bad input: each bad case fails alone with a one-line error naming its file and the cause, the other cases
complete, the exit code says a case failed, and no output file exists for a bad case."""
from __future__ import annotations

import gzip
import json
import os

import nibabel as nib
import numpy as np
import pytest

from trtseg import synthetic as syn
from trtseg.cli import main
from trtseg.errors import ModelFolderError
from trtseg.model_folder import load_model_folder

from conftest import write_case


def _save(path, arr, affine=None, pixdim=None):
    img = nib.Nifti1Image(arr, np.diag([1.0, 1.0, 2.0, 1.0]) if affine is None else affine)
    if pixdim is not None:
        img.header["pixdim"][1:4] = pixdim
    nib.save(img, path)
    return path


def _bad_inputs(d: str) -> dict[str, str]:
    """case id -> the cause the error must name."""
    os.makedirs(d, exist_ok=True)
    good = syn.ct_like_volume((30, 28, 12), seed=4).astype(np.int16)
    raw = open(write_case(d, "good", (30, 28, 12), (1.0, 1.0, 2.0), seed=4)[0], "rb").read()
    open(os.path.join(d, "truncated_0000.nii.gz"), "wb").write(raw[: len(raw) // 2])
    open(os.path.join(d, "notnifti_0000.nii.gz"), "wb").write(gzip.compress(b"this is a PNG, honestly" * 40))
    _save(os.path.join(d, "twod_0000.nii.gz"), good[:, :, 0])
    _save(os.path.join(d, "fourd.nii.gz"), np.stack([good] * 3, axis=-1))
    nan = good.astype(np.float32)
    nan[3, 4, 5] = np.nan
    _save(os.path.join(d, "nan_0000.nii.gz"), nan)
    inf = good.astype(np.float32)
    inf[1, 1, 1] = np.inf
    _save(os.path.join(d, "inf_0000.nii.gz"), inf)
    _save(os.path.join(d, "zerodim_0000.nii.gz"), np.zeros((0, 28, 12), np.int16))
    _save(os.path.join(d, "negpixdim_0000.nii.gz"), good, pixdim=[1.0, -1.0, 2.0])
    _save(os.path.join(d, "zeropixdim_0000.nii.gz"), good, pixdim=[0.0, 1.0, 2.0])
    _save(os.path.join(d, "twochannels_0000.nii.gz"), good)
    _save(os.path.join(d, "twochannels_0001.nii.gz"), good)
    return {"truncated": "truncated or corrupt gzip", "notnifti": "not a NIfTI file", "twod": "2-D image",
            "fourd": "3 channel(s), the model expects 1", "nan": "NaN or Inf", "inf": "NaN or Inf",
            "zerodim": "dimension of size 0", "negpixdim": "invalid voxel spacing",
            "zeropixdim": "invalid voxel spacing", "twochannels": "2 channel file(s), the model expects 1"}


def test_bad_cases_fail_alone_with_one_line_errors_and_no_output(small_model, tmp_path):
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    expected = _bad_inputs(inp)
    _save(os.path.join(inp, "allzero_0000.nii.gz"), np.zeros((20, 22, 9), np.int16))
    rc = main(["predict", "-i", inp, "-o", out, "-m", small_model, "-f", "0", "--disable-tta"])
    assert rc == 1, "a failed case must make the exit code non-zero"
    report = json.load(open(os.path.join(out, "run_report.json")))
    by_id = {c["case_id"]: c for c in report["cases"]}
    assert by_id["good"]["status"] == "ok" and os.path.exists(os.path.join(out, "good.nii.gz"))
    for cid, cause in expected.items():
        entry = by_id[cid]
        assert entry["status"] == "failed", cid
        err = entry["error"]
        assert "\n" not in err and cause in err, f"{cid}: {err}"
        assert cid in err.split(":")[0], f"the error must name the file: {err}"
        assert not os.path.exists(os.path.join(out, f"{cid}.nii.gz")), f"partial output for {cid}"
    # an all-zero volume is a valid case: an empty mask with the input's shape
    assert by_id["allzero"]["status"] == "ok"
    mask = nib.load(os.path.join(out, "allzero.nii.gz"))
    assert mask.shape == (20, 22, 9) and not np.asarray(mask.dataobj).any()
    assert sorted(os.listdir(out)) == [".trtseg", "allzero.nii.gz", "good.nii.gz", "run_report.json"], "stray files left"


def test_channel_files_that_disagree(tmp_path):
    ds = syn.dataset_dict(num_channels=2, num_labels=3)
    model = syn.make_model_folder(str(tmp_path / "m2"), folds=(0,), patch_size=(16, 16, 16), features=(4, 8),
                                  normalization=("CTNormalization", "ZScoreNormalization"),
                                  use_mask_for_norm=(False, False), dataset_json=ds)
    inp, out = tmp_path / "in", tmp_path / "out"
    write_case(str(inp), "ok", (20, 20, 10), (1.0, 1.0, 1.0), channels=2)
    vol = syn.ct_like_volume((20, 20, 10)).astype(np.int16)
    _save(str(inp / "shape_0000.nii.gz"), vol)
    _save(str(inp / "shape_0001.nii.gz"), vol[:, :, :9])
    _save(str(inp / "affine_0000.nii.gz"), vol, np.diag([1.0, 1.0, 1.0, 1.0]))
    _save(str(inp / "affine_0001.nii.gz"), vol, np.diag([1.0, 1.0, 1.5, 1.0]))
    assert main(["predict", "-i", str(inp), "-o", str(out), "-m", model, "--disable-tta"]) == 1
    by_id = {c["case_id"]: c for c in json.load(open(out / "run_report.json"))["cases"]}
    assert by_id["ok"]["status"] == "ok"
    assert "shape_0001.nii.gz" in by_id["shape"]["error"] and "shape" in by_id["shape"]["error"]
    assert "affine_0001.nii.gz" in by_id["affine"]["error"] and "affine differs" in by_id["affine"]["error"]
    assert not (out / "shape.nii.gz").exists() and not (out / "affine.nii.gz").exists()


def test_model_folder_errors_name_the_file(small_model, tmp_path):
    with pytest.raises(ModelFolderError, match="no fold_N/checkpoint_best.pth"):
        load_model_folder(small_model, None, "checkpoint_best.pth")
    with pytest.raises(ModelFolderError, match="missing checkpoint .*fold_7/checkpoint_final.pth"):
        load_model_folder(small_model, ["7"])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "dataset.json").write_text(open(os.path.join(small_model, "dataset.json")).read())
    with pytest.raises(ModelFolderError, match="missing plans.json"):
        load_model_folder(str(broken), ["0"])
    (broken / "plans.json").write_text("{not json")
    with pytest.raises(ModelFolderError, match="plans.json: not valid JSON"):
        load_model_folder(str(broken), ["0"])
    # a CLI user gets one line on stderr and exit code 2
    assert main(["predict", "-i", str(tmp_path), "-o", str(tmp_path / "o"), "-m", str(broken)]) == 2
