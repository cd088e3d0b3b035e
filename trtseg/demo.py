"""The demo's inputs: real T1 MRI scans and their reference brain masks, laid out for `trtseg predict`.

Data (fetched by scripts/demo_data.sh from package registries into DATA, default data/demo):
  - colin27: Debian mricron-data's Colin27 head T1 (ch2.nii.gz, 1 mm, 181 x 217 x 181); reference mask
    ch2bet.nii.gz > 0. The demo model never saw it: this is the held-out test.
  - colin27_3mm: the same scan as a clinical thick-slice acquisition would give it, 1 x 1 x 3 mm (the mean of each
    3 axial slices, 181 x 217 x 60), with the reference mask reduced by majority; it exercises resampling to the
    model's 2 mm grid and back on anisotropic real data.
  - mni152, only where Colin27 could not be fetched (no apt): nilearn's MNI152 2009a T1 template, already
    skull-stripped, with reference mask T1 > 0 (holes filled). It is the model's training template and, having no
    skull, out of the distribution the model was trained on: its Dice is no test.
The model is demo/brain_model, an nnU-Net v2 folder trained by demo/train_brain_model.py.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import nibabel as nib
import numpy as np

MODEL_FOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo", "brain_model")
COLIN = ("ch2.nii.gz", "ch2bet.nii.gz")
MNI = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


@dataclass(frozen=True)
class DemoCase:
    case_id: str
    note: str


def prepare_inputs(data_dir: str, root: str) -> list[DemoCase]:
    """Writes ROOT/images/CASE_0000.nii.gz and ROOT/reference/CASE.nii.gz (uint8) for each scan found in DATA."""
    images, refs = os.path.join(root, "images"), os.path.join(root, "reference")
    os.makedirs(images, exist_ok=True)
    os.makedirs(refs, exist_ok=True)
    cases = []
    head, brain = (os.path.join(data_dir, f) for f in COLIN)
    if os.path.exists(head) and os.path.exists(brain):
        shutil.copyfile(head, os.path.join(images, "colin27_0000.nii.gz"))
        bet = nib.load(brain)
        _save_mask(os.path.join(refs, "colin27.nii.gz"), np.asarray(bet.dataobj) > 0, bet)
        cases.append(DemoCase("colin27", "held-out test: reference is ch2bet > 0"))
        _save_thick_slices(head, brain, os.path.join(images, "colin27_3mm_0000.nii.gz"),
                           os.path.join(refs, "colin27_3mm.nii.gz"))
        cases.append(DemoCase("colin27_3mm", "held-out test, resliced to 1 x 1 x 3 mm"))
    mni = os.path.join(data_dir, MNI)
    if not cases and os.path.exists(mni):
        from scipy import ndimage
        img = nib.load(mni)
        shutil.copyfile(mni, os.path.join(images, "mni152_0000.nii.gz"))
        _save_mask(os.path.join(refs, "mni152.nii.gz"), ndimage.binary_fill_holes(np.asarray(img.dataobj) > 0), img)
        cases.append(DemoCase("mni152", "the training template, not a test: reference is T1 > 0"))
    if not cases:
        raise FileNotFoundError(f"{data_dir}: no demo scans; run `bash scripts/demo_data.sh {data_dir}` (or `make demo`)")
    return cases


def _save_thick_slices(head_url: str, brain_url: str, image_out: str, mask_out: str, k: int = 3) -> None:
    head, brain = nib.load(head_url), nib.load(brain_url)
    t1 = np.asarray(head.dataobj, dtype=np.float32)
    n = t1.shape[2] // k
    thick = t1[:, :, :n * k].reshape(t1.shape[0], t1.shape[1], n, k).mean(axis=3)
    ref = (np.asarray(brain.dataobj)[:, :, :n * k] > 0).reshape(t1.shape[0], t1.shape[1], n, k).sum(axis=3) * 2 > k
    affine = head.affine.copy()
    affine[:3, 2] *= k  # the z voxel axis, now k mm
    affine[:3, 3] += head.affine[:3, 2] * (k - 1) / 2  # centre of the first thick slice
    img = nib.Nifti1Image(np.round(thick).astype(np.int16), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, image_out)
    _save_mask(mask_out, ref, img)


def _save_mask(path: str, mask_xyz: np.ndarray, like: nib.Nifti1Image) -> None:
    img = nib.Nifti1Image(mask_xyz.astype(np.uint8), like.affine, header=like.header)
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1.0, 0.0)
    nib.save(img, path)
