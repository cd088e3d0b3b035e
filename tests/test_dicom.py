"""DICOM series in: the masks of SimpleITK's NIfTI conversion of the same series, voxel for voxel with its geometry,
on both paths; bad series refused with one line each while the other cases complete."""
from __future__ import annotations

import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from trtseg import synthetic as syn
from trtseg.cli import main

from dicom_series import write_series

pytestmark = pytest.mark.usefixtures("ray_local")


def _ct(shape_xyz, seed):
    return syn.ct_like_volume(shape_xyz, seed=seed, zero_border=2).transpose(2, 1, 0)  # (z, y, x) HU


def _oblique(folder, seed=3, **kw):
    a = np.deg2rad(14)
    return write_series(folder, _ct((48, 44, 14), seed), (2.6, 0.9, 0.8), row_dir=(np.cos(a), np.sin(a), 0.0),
                        col_dir=(-np.sin(a), np.cos(a), 0.0), origin=(-20.0, 10.0, 5.0), slope=0.5, **kw)


def test_a_series_gives_the_masks_of_its_simpleitk_nifti_conversion(small_model, tmp_path):
    """An oblique, anisotropic int16 series with rescale slope 0.5: the mask equals the one trtseg makes from
    SimpleITK's conversion of the series to NIfTI (the route nnU-Net users take), with the same geometry; on both
    paths; a rerun skips it."""
    import SimpleITK as sitk

    _oblique(str(tmp_path / "dicom" / "ct1"))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "dicom" / "ct1")))
    os.makedirs(tmp_path / "nifti")
    sitk.WriteImage(reader.Execute(), str(tmp_path / "nifti" / "ct1_0000.nii.gz"))
    common = ["-m", small_model, "-f", "0", "--disable-tta", "--no-progress"]
    assert main(["predict", "-i", str(tmp_path / "nifti"), "-o", str(tmp_path / "ref"), "--single-process", *common]) == 0
    ref = nib.load(str(tmp_path / "ref" / "ct1.nii.gz"))
    assert len(np.unique(np.asarray(ref.dataobj))) >= 2
    for path, extra in (("single", ["--single-process"]), ("ray", ["--cpu-actors", "1"])):
        out = tmp_path / path
        assert main(["predict", "-i", str(tmp_path / "dicom"), "-o", str(out), *extra, *common]) == 0
        ours = nib.load(str(out / "ct1.nii.gz"))
        assert np.array_equal(np.asarray(ours.dataobj), np.asarray(ref.dataobj)), path
        np.testing.assert_allclose(ours.affine, ref.affine, atol=1e-5)
        assert int(ours.header["qform_code"]) == int(ref.header["qform_code"]) == 1
        assert int(ours.header["sform_code"]) == int(ref.header["sform_code"]) == 1
    assert main(["predict", "-i", str(tmp_path / "dicom"), "-o", str(tmp_path / "single"), "--single-process",
                 *common]) == 0
    assert json.load(open(tmp_path / "single" / "run_report.json"))["cases"][0]["status"] == "skipped"
    # -i may name the series folder itself: it is the case
    assert main(["predict", "-i", str(tmp_path / "dicom" / "ct1"), "-o", str(tmp_path / "one"), "--single-process",
                 *common]) == 0
    assert np.array_equal(np.asarray(nib.load(str(tmp_path / "one" / "ct1.nii.gz")).dataobj), np.asarray(ref.dataobj))


def test_bad_series_fail_with_one_line_each_and_the_others_complete(small_model, tmp_path):
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    from trtseg.dicom import pydicom

    pd = pydicom()
    root = tmp_path / "in"
    _oblique(str(root / "good"))
    mixed = root / "mixed"
    _oblique(str(mixed), seed=4)
    extra = _oblique(str(tmp_path / "other"), seed=5)[0]
    shutil.copy(extra, mixed / "XX0000.dcm")
    missing = _oblique(str(root / "missing"), shuffle_seed=None)
    os.remove(missing[6])
    dup = _oblique(str(root / "duplicated"))
    shutil.copy(dup[3], root / "duplicated" / "COPY.dcm")
    normal_positions = [np.array([-20.0, 10.0, 5.0]) + np.array([0, 0, 1.0]) * z for z in
                        np.concatenate([np.arange(7) * 2.6, 7 * 2.6 + np.arange(7) * 2.9])]
    _oblique(str(root / "uneven"), positions=normal_positions)
    tilted = [np.array([-20.0 + 0.3 * z, 10.0, 5.0 + 2.6 * z]) for z in range(14)]
    _oblique(str(root / "tilted"), positions=tilted)
    sr = pd.Dataset()
    sr.file_meta = pd.dataset.FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = pd.uid.ExplicitVRLittleEndian
    sr.file_meta.MediaStorageSOPClassUID = sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR
    sr.file_meta.MediaStorageSOPInstanceUID = sr.SOPInstanceUID = pd.uid.generate_uid()
    sr.Modality, sr.SeriesInstanceUID = "SR", pd.uid.generate_uid()
    os.makedirs(root / "report")
    sr.save_as(str(root / "report" / "SR0001.dcm"), enforce_file_format=True)
    for path in _oblique(str(root / "undecodable")):
        ds = pd.dcmread(path)
        ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 64])  # a JPEG 2000 codestream that breaks off
        ds["PixelData"].VR = "OB"
        ds.save_as(path, enforce_file_format=True)
    assert main(["predict", "-i", str(root), "-o", str(tmp_path / "out"), "-m", small_model, "-f", "0",
                 "--disable-tta", "--no-progress", "--single-process"]) == 1
    cases = {c["case_id"]: c for c in json.load(open(tmp_path / "out" / "run_report.json"))["cases"]}
    assert cases["good"]["status"] == "ok"
    expected = {"mixed": "mixed series in one folder: 2 SeriesInstanceUIDs", "missing": "missing slice(s)",
                "duplicated": "duplicated slice position", "uneven": "non-uniform slice spacing",
                "tilted": "gantry tilt", "report": "non-image DICOM objects (SR)",
                "undecodable": "cannot decode the series (transfer syntax JPEG 2000"}
    for case, text in expected.items():
        c = cases[case]
        assert c["status"] == "failed" and text in c["error"] and "\n" not in c["error"], (case, c["error"])
        assert str(root / case) in c["error"], c["error"]  # names the series
        assert not os.path.exists(tmp_path / "out" / f"{case}.nii.gz")


def test_dicom_seg_out_references_the_series_and_reads_back(small_model, tmp_path):
    """--output-format both writes CASE.seg.dcm beside CASE.nii.gz: highdicom and pydicom read it back, one segment
    per label of dataset.json with its name, the algorithm named, every frame's source instance in the series, and
    its label map equal to the NIfTI mask. dicom-seg alone records the Segmentation as the case's mask (reruns
    skip it); a NIfTI input asked for a Segmentation fails its case in one line."""
    import highdicom as hd

    from trtseg.dicom import pydicom

    pd = pydicom()
    paths = _oblique(str(tmp_path / "in" / "ct1"))
    common = ["-m", small_model, "-f", "0", "--disable-tta", "--no-progress", "--single-process"]
    assert main(["predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "both"), "--output-format", "both",
                 *common]) == 0
    nifti = np.asarray(nib.load(str(tmp_path / "both" / "ct1.nii.gz")).dataobj).transpose(2, 1, 0)  # (z, y, x)
    seg_file = str(tmp_path / "both" / "ct1.seg.dcm")
    raw = pd.dcmread(seg_file)
    assert raw.Modality == "SEG" and raw.SegmentationType == "BINARY"
    seg = hd.seg.segread(seg_file)
    ds = json.load(open(os.path.join(small_model, "dataset.json")))
    names = {v: k for k, v in ds["labels"].items() if v}
    assert [(s.SegmentNumber, s.SegmentLabel) for s in seg.SegmentSequence] == \
        [(i + 1, names[v]) for i, v in enumerate(sorted(names))]
    assert seg.SegmentSequence[0].SegmentAlgorithmName == "trtseg"
    sources = {pd.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in paths}
    referenced = {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(sources)
    # the label map over the source slices, in the mask's z order (along the normal from the volume's origin)
    heads = sorted((pd.dcmread(p, stop_before_pixels=True) for p in paths), key=lambda h: float(h.ImagePositionPatient[2]))
    uids = [h.SOPInstanceUID for h in heads]
    labels = seg.get_pixels_by_source_instance(uids, combine_segments=True, skip_overlap_checks=True)
    present = sorted(names)
    expected = np.zeros_like(nifti, dtype=np.int64)
    for i, v in enumerate(present):
        expected[nifti == v] = i + 1
    assert np.array_equal(labels, expected)
    # the Ray job writes the same Segmentation (its write task runs the same write_case)
    assert main(["predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "ray"), "--output-format", "both",
                 *common[:-1], "--cpu-actors", "1"]) == 0
    ray_seg = hd.seg.segread(str(tmp_path / "ray" / "ct1.seg.dcm"))
    assert np.array_equal(ray_seg.get_pixels_by_source_instance(uids, combine_segments=True, skip_overlap_checks=True),
                          expected)
    # dicom-seg alone: the Segmentation is the mask the ledger records; a rerun skips it
    for _ in range(2):
        assert main(["predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "seg"), "--output-format",
                     "dicom-seg", *common]) == 0
    assert sorted(os.listdir(tmp_path / "seg")) == [".trtseg", "ct1.seg.dcm", "run_report.json"]
    assert json.load(open(tmp_path / "seg" / "run_report.json"))["cases"][0]["status"] == "skipped"
    # a NIfTI input cannot have a Segmentation of a series it does not have
    nif = str(tmp_path / "nifti")
    shutil.copytree(str(tmp_path / "both"), nif, ignore=shutil.ignore_patterns("*.dcm", ".trtseg", "*.json"))
    os.rename(os.path.join(nif, "ct1.nii.gz"), os.path.join(nif, "x_0000.nii.gz"))
    assert main(["predict", "-i", nif, "-o", str(tmp_path / "bad"), "--output-format", "dicom-seg", *common]) == 1
    case = json.load(open(tmp_path / "bad" / "run_report.json"))["cases"][0]
    assert "needs a DICOM series input" in case["error"] and not os.path.exists(tmp_path / "bad" / "x.seg.dcm")
