"""The demo: real scans (Colin27 from Debian's mricron-data), the project's trained brain-extraction model, QC
pictures and Dice; and `trtseg qc` on its own, with failed, missing and mismatched cases."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from trtseg import demo
from trtseg import synthetic as syn
from trtseg.qc import qc_folder

from conftest import nnunet_predict, voxel_agreement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "data", "demo")


@pytest.fixture(scope="module")
def demo_data() -> str:
    if not os.path.exists(os.path.join(DATA, "ch2.nii.gz")):
        if shutil.which("apt-get") is None:
            pytest.skip("Colin27 comes from Debian's mricron-data and apt is not available here")
        subprocess.run(["bash", os.path.join(ROOT, "scripts", "demo_data.sh"), DATA], check=True,
                       env={**os.environ, "PYTHON": sys.executable})
    return DATA


def test_demo_segments_colin27_with_dice_over_0_9_and_draws_it(demo_data, tmp_path):
    out = tmp_path / "demo"
    trtseg = os.path.join(os.path.dirname(sys.executable), "trtseg")
    proc = subprocess.run([trtseg, "demo", "--data", demo_data, "--output", str(out)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dice = {m.group(1): float(m.group(2)) for m in re.finditer(r"^\s+(\S+): ok, Dice ([0-9.]+)", proc.stdout, re.M)}
    assert set(dice) == {"colin27", "colin27_3mm"}, proc.stdout
    assert min(dice.values()) >= 0.9, dice
    masks = out / "masks"
    for case in dice:
        png = masks / "qc" / f"{case}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
        assert str(png) in proc.stdout
        mask = nib.load(str(masks / f"{case}.nii.gz"))
        image = nib.load(str(out / "images" / f"{case}_0000.nii.gz"))
        assert np.allclose(mask.affine, image.affine) and mask.shape == image.shape
    page = (masks / "qc" / "index.html").read_text()
    assert page.count("<img ") == 2 and "colin27_3mm.png" in page
    assert (masks / "run_report.json").exists()


def test_demo_model_gives_nnunetv2s_own_masks(demo_data, tmp_path):
    demo.prepare_inputs(demo_data, str(tmp_path))
    case = [str(tmp_path / "images" / "colin27_0000.nii.gz")]
    ref = nnunet_predict(demo.MODEL_FOLDER, [case], str(tmp_path / "nnunet"), folds=(0,))[0]
    from trtseg.cli import main
    assert main(["predict", "-i", case[0], "-o", str(tmp_path / "trtseg"), "-m", demo.MODEL_FOLDER,
                 "--single-process"]) == 0
    assert voxel_agreement(ref, str(tmp_path / "trtseg" / "colin27.nii.gz")) >= 0.999


def test_qc_reports_failed_missing_and_mismatched_cases_without_stopping(tmp_path):
    images, masks, refs = (tmp_path / d for d in ("images", "masks", "refs"))
    for d in (images, masks, refs):
        d.mkdir()
    aff = syn.affine_for((0.8, 0.8, 3.0), oblique_deg=15)
    vol = syn.ct_like_volume((40, 36, 12), seed=1)
    body = (vol > -500).astype(np.uint8)
    for case in ("good", "failed", "missing", "mismatch"):
        syn.save_nifti(str(images / f"{case}_0000.nii.gz"), vol, aff)
    syn.save_nifti(str(masks / "good.nii.gz"), body, aff, np.uint8)
    syn.save_nifti(str(refs / "good.nii.gz"), body, aff, np.uint8)
    syn.save_nifti(str(masks / "mismatch.nii.gz"), body, aff, np.uint8)
    syn.save_nifti(str(refs / "mismatch.nii.gz"), body[:-1], aff, np.uint8)
    (masks / "run_report.json").write_text(
        '{"cases": [{"case_id": "failed", "status": "failed", "error": "failed_0000.nii.gz: truncated gzip",'
        ' "seconds": {"read": 0.1}}, {"case_id": "good", "status": "ok", "seconds": {"infer": 1.5}}],'
        ' "summary": {"ok": 1, "failed": 1, "total": 2, "wall_seconds": 3.0}}')
    res = {r.case_id: r for r in qc_folder(str(images), str(masks), str(refs))}
    assert res["good"].status == "ok" and res["good"].dice == 1.0 and os.path.exists(res["good"].picture)
    assert res["failed"].status == "failed" and res["failed"].picture is None
    assert res["missing"].status == "missing" and res["missing"].picture is None
    assert res["mismatch"].status == "qc failed" and "mismatch" in res["mismatch"].error
    page = (masks / "qc" / "index.html").read_text()
    assert "truncated gzip" in page and page.count("<img ") == 1 and "1.50" in page
