"""DICOM series in: the masks of SimpleITK's NIfTI conversion of the same series, voxel for voxel with its geometry,
on both paths; bad series refused with one line each while the other cases complete."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import warnings

import nibabel as nib
import numpy as np
import pytest

from trtseg import synthetic as syn
from trtseg.cli import main


pytestmark = pytest.mark.usefixtures("ray_local")


def _ct(shape_xyz, seed):
    return syn.ct_like_volume(shape_xyz, seed=seed, zero_border=2).transpose(2, 1, 0)  # (z, y, x) HU


def _oblique(folder, seed=3, **kw):
    a = np.deg2rad(14)
    return syn.save_dicom_series(folder, _ct((48, 44, 14), seed), (2.6, 0.9, 0.8), row_dir=(np.cos(a), np.sin(a), 0.0),
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
    # QC pictures of DICOM cases: the series and its NIfTI mask through one reader
    assert main(["qc", "-i", str(tmp_path / "dicom"), "-o", str(tmp_path / "single")]) == 0
    assert os.path.getsize(tmp_path / "single" / "qc" / "ct1.png") > 1000
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
    if shutil.which("dciodvfy"):  # dicom3tools' validator (scripts/install.sh installs it where apt-get can)
        source_report = subprocess.run(["dciodvfy", paths[0]], capture_output=True, text=True).stderr
        assert "Error" not in source_report, source_report  # the test's own series is a valid CT series ...
        report = subprocess.run(["dciodvfy", seg_file], capture_output=True, text=True)
        assert report.returncode == 0 and "Segmentation" in report.stderr, report.stderr
        assert not [line for line in report.stderr.splitlines() if line.startswith(("Error", "Warning"))], \
            report.stderr  # ... and so is the Segmentation
    else:
        warnings.warn("dciodvfy (dicom3tools) is not installed: the Segmentation was not validated by it")
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


def _sitk_nifti(source: str, dest: str) -> None:
    """SimpleITK's conversion of a series folder (or one multi-frame file) to NIfTI: the route users take today."""
    import SimpleITK as sitk

    if os.path.isdir(source):
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(source))
        img = reader.Execute()
    else:
        img = sitk.ReadImage(source)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    sitk.WriteImage(img, dest)


def _same_mask(a: str, b: str) -> None:
    x, y = nib.load(a), nib.load(b)
    assert np.array_equal(np.asarray(x.dataobj), np.asarray(y.dataobj)), (a, b)
    np.testing.assert_allclose(x.affine, y.affine, atol=1e-4)


def _stack_real_slice(src: str, folder: str, n: int, seed: int = 0, roll: bool = True) -> list[str]:
    """A series of ``n`` slices made from one real DICOM file of pydicom's test data: every header attribute as
    the scanner wrote it, new SOP instance UIDs, positions stepped along the slice normal by SliceThickness (or
    2 mm), and (``roll``, uncompressed files only) the slice's pixels rolled per slice so that the volume is not
    constant along z. Compressed files keep their pixel data and transfer syntax."""
    from trtseg.dicom import pydicom

    pd = pydicom()
    ds = pd.dcmread(src)
    os.makedirs(folder, exist_ok=True)
    o = np.array([float(v) for v in ds.ImageOrientationPatient])
    normal = np.cross(o[:3], o[3:])
    p0 = np.array([float(v) for v in ds.ImagePositionPatient])
    step = float(getattr(ds, "SliceThickness", 0) or 2.0)
    series = pd.uid.generate_uid()
    order = np.random.default_rng(seed).permutation(n)
    paths = []
    for k, z in enumerate(order):
        s = pd.dcmread(src)
        s.SeriesInstanceUID = series
        s.SOPInstanceUID = s.file_meta.MediaStorageSOPInstanceUID = pd.uid.generate_uid()
        s.InstanceNumber = int(z) + 1
        s.ImagePositionPatient = [f"{v:.4f}" for v in p0 + normal * step * z]
        if roll:
            s.PixelData = np.roll(s.pixel_array, 3 * int(z), axis=1).tobytes()
        paths.append(os.path.join(folder, f"S{k:03d}.dcm"))
        s.save_as(paths[-1], enforce_file_format=True)
    return paths


def test_real_dicom_files_from_pydicom_in_every_common_transfer_syntax(small_model, tmp_path):
    """pydicom's own test files (they ship in its wheel): its real CT slice (CT_small.dcm) stacked into a series
    gives the masks of its SimpleITK NIfTI conversion; its real MR slice uncompressed, RLE, JPEG 2000 lossless and
    JPEG-LS lossless decodes to one volume, so all four give one mask."""
    from pydicom.data import get_testdata_file

    root = tmp_path / "in"
    _stack_real_slice(get_testdata_file("CT_small.dcm"), str(root / "ct"), 6)
    mr = {"mr_plain": "MR_small.dcm", "mr_rle": "MR_small_RLE.dcm", "mr_j2k": "MR_small_jp2klossless.dcm",
          "mr_jls": "MR_small_jpeg_ls_lossless.dcm"}
    for case, name in mr.items():
        _stack_real_slice(get_testdata_file(name), str(root / case), 5, seed=1, roll=False)
    _sitk_nifti(str(root / "ct"), str(tmp_path / "nifti" / "ct_0000.nii.gz"))
    common = ["-m", small_model, "-f", "0", "--disable-tta", "--no-progress", "--single-process"]
    assert main(["predict", "-i", str(root), "-o", str(tmp_path / "out"), *common]) == 0
    assert main(["predict", "-i", str(tmp_path / "nifti"), "-o", str(tmp_path / "ref"), *common]) == 0
    _same_mask(str(tmp_path / "out" / "ct.nii.gz"), str(tmp_path / "ref" / "ct.nii.gz"))
    plain = tmp_path / "out" / "mr_plain.nii.gz"
    assert len(np.unique(np.asarray(nib.load(str(plain)).dataobj))) >= 2
    for case in ("mr_rle", "mr_j2k", "mr_jls"):
        _same_mask(str(tmp_path / "out" / f"{case}.nii.gz"), str(plain))


def test_a_study_folder_takes_the_series_a_rule_picks(small_model, tmp_path):
    """A study folder with two CT series and a structured report: refused without a rule, naming the options; a
    SeriesDescription or SeriesInstanceUID rule picks one series, whose mask equals that series' own folder's;
    a rule that picks none or two fails the case in one line that lists the series found."""
    from trtseg.dicom import pydicom

    pd = pydicom()
    study = tmp_path / "in" / "study1"
    thin_uid = pd.uid.generate_uid()
    _oblique(str(study), seed=3, series_uid=thin_uid, description="Abdomen 1.0 B30f", prefix="A")
    _oblique(str(study), seed=4, description="Topogram 0.6 T20s", prefix="B")
    _oblique(str(tmp_path / "alone" / "study1"), seed=3, description="Abdomen 1.0 B30f")
    sr = pd.Dataset()
    sr.file_meta = pd.dataset.FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = pd.uid.ExplicitVRLittleEndian
    sr.file_meta.MediaStorageSOPClassUID = sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"
    sr.file_meta.MediaStorageSOPInstanceUID = sr.SOPInstanceUID = pd.uid.generate_uid()
    sr.Modality, sr.SeriesInstanceUID = "SR", pd.uid.generate_uid()
    sr.save_as(str(study / "SR0001.dcm"), enforce_file_format=True)
    common = ["-m", small_model, "-f", "0", "--disable-tta", "--no-progress", "--single-process"]
    assert main(["predict", "-i", str(tmp_path / "alone"), "-o", str(tmp_path / "ref"), *common]) == 0

    def run(out: str, *rule: str) -> dict:
        code = main(["predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / out), *common, *rule])
        case = json.load(open(tmp_path / out / "run_report.json"))["cases"][0]
        assert code == (1 if case["status"] == "failed" else 0)
        return case

    case = run("none")
    assert case["status"] == "failed" and "3 SeriesInstanceUIDs" in case["error"] and "--series-uid" in case["error"]
    for out, rule in (("desc", ["--series-description", r"abdomen 1\.0"]), ("uid", ["--series-uid", thin_uid])):
        assert run(out, *rule)["status"] == "ok", rule
        _same_mask(str(tmp_path / out / "study1.nii.gz"), str(tmp_path / "ref" / "study1.nii.gz"))
    two = run("two", "--series-modality", "CT")
    assert two["status"] == "failed" and "2 series match --series-modality CT" in two["error"], two["error"]
    assert "'Topogram 0.6 T20s'" in two["error"] and "\n" not in two["error"]
    none = run("mr", "--series-modality", "MR")
    assert none["status"] == "failed" and "no series matches --series-modality MR" in none["error"]
    assert str(study) in none["error"] and not os.path.exists(tmp_path / "mr" / "study1.nii.gz")
    # the rule is part of what made the mask: another rule redoes the case, the same one skips it
    assert run("desc", "--series-description", r"abdomen 1\.0")["status"] == "skipped"
    assert run("desc", "--series-uid", thin_uid)["reason"] == "settings changed"


def test_an_enhanced_multi_frame_ct_is_read_as_simpleitk_reads_it(small_model, tmp_path):
    """A Legacy Converted Enhanced CT object (highdicom's conversion of a series into one multi-frame file): its
    mask equals that of SimpleITK's NIfTI conversion of the file, and its voxels sit where the single-frame
    series' do in patient space. A multi-frame object whose frames are out of order is refused: GDCM would stack
    them as stored."""
    import highdicom as hd

    from trtseg.dicom import pydicom

    pd = pydicom()
    paths = _oblique(str(tmp_path / "series" / "ct1"))
    frames = [pd.dcmread(p) for p in paths]
    mf = hd.legacy.LegacyConvertedEnhancedCTImage(frames, series_instance_uid=hd.UID(), series_number=2,
                                                  sop_instance_uid=hd.UID(), instance_number=1)
    os.makedirs(tmp_path / "in" / "ct1")
    mf.save_as(str(tmp_path / "in" / "ct1" / "MF0001.dcm"))
    _sitk_nifti(str(tmp_path / "in" / "ct1" / "MF0001.dcm"), str(tmp_path / "nifti" / "ct1_0000.nii.gz"))
    common = ["-m", small_model, "-f", "0", "--disable-tta", "--no-progress", "--single-process"]
    for src, out in (("in", "mf"), ("nifti", "ref"), ("series", "single")):
        assert main(["predict", "-i", str(tmp_path / src), "-o", str(tmp_path / out), *common]) == 0
    _same_mask(str(tmp_path / "mf" / "ct1.nii.gz"), str(tmp_path / "ref" / "ct1.nii.gz"))
    mf_img, single = nib.load(str(tmp_path / "mf" / "ct1.nii.gz")), nib.load(str(tmp_path / "single" / "ct1.nii.gz"))
    nz = mf_img.shape[2]
    corners = np.array([[0, 0, 0, 1], [5, 7, 0, 1], [3, 2, nz - 1, 1]], float)
    flipped = corners.copy()
    flipped[:, 2] = nz - 1 - corners[:, 2]  # the frames are stored along the other direction than the series
    np.testing.assert_allclose(corners @ mf_img.affine.T, flipped @ single.affine.T, atol=1e-3)
    # two frames' positions swapped: out of order in the file
    ds = pd.dcmread(str(tmp_path / "in" / "ct1" / "MF0001.dcm"))
    groups = ds.PerFrameFunctionalGroupsSequence
    a, b = groups[2].PlanePositionSequence[0], groups[5].PlanePositionSequence[0]
    a.ImagePositionPatient, b.ImagePositionPatient = list(b.ImagePositionPatient), list(a.ImagePositionPatient)
    ds.save_as(str(tmp_path / "in" / "ct1" / "MF0001.dcm"))
    assert main(["predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "bad"), *common]) == 1
    case = json.load(open(tmp_path / "bad" / "run_report.json"))["cases"][0]
    assert "frames are not in order" in case["error"] and str(tmp_path / "in" / "ct1") in case["error"]


def test_a_study_in_s3_gives_the_local_masks_and_segmentation(s3, small_model, tmp_path):
    """Any fsspec storage: a study folder (two series) in moto's S3 on loopback, a rule picking one series, the
    NIfTI mask and the Segmentation written to the bucket; the mask equals the local run's, and the Segmentation
    cites only the chosen series' instances."""
    import highdicom as hd

    from trtseg.dicom import pydicom

    opts, fs = s3
    chosen = pydicom().uid.generate_uid()
    paths = _oblique(str(tmp_path / "in" / "study2"), seed=3, series_uid=chosen, description="Venous", prefix="V")
    _oblique(str(tmp_path / "in" / "study2"), seed=4, description="Arterial", prefix="A")
    fs.put(str(tmp_path / "in") + "/", "trtseg-bucket/dicom-in/", recursive=True)
    common = ["-m", small_model, "-f", "0", "--disable-tta", "--no-progress", "--single-process",
              "--series-description", "venous", "--output-format", "both"]
    assert main(["predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "local"), *common]) == 0
    assert main(["predict", "-i", "s3://trtseg-bucket/dicom-in", "-o", "s3://trtseg-bucket/dicom-out",
                 "--storage-options", json.dumps(opts), *common]) == 0
    for name in ("study2.nii.gz", "study2.seg.dcm"):
        fs.get(f"trtseg-bucket/dicom-out/{name}", str(tmp_path / name))
    _same_mask(str(tmp_path / "study2.nii.gz"), str(tmp_path / "local" / "study2.nii.gz"))
    seg = hd.seg.segread(str(tmp_path / "study2.seg.dcm"))
    cited = {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == chosen
    assert cited == {pydicom().dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths}
