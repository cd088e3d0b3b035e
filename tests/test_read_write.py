"""Reading and writing NIfTI: the fast paths (integer cast, Fortran-ordered write) give exactly nibabel's values."""
from __future__ import annotations

import time

import nibabel as nib
import numpy as np
import pytest
import torch

from trtseg.read import read_case
from trtseg.write import write_mask

AFFINE = np.array([[0.0, -0.8, 0.0, 10.0], [0.0, 0.0, 1.3, -5.0], [-0.7, 0.0, 0.0, 3.0], [0, 0, 0, 1]])


@pytest.mark.parametrize("dtype,slope,inter", [(np.int16, None, None), (np.uint8, None, None), (np.int32, None, None),
                                               (np.int16, 2.0, -1024.0), (np.float32, None, None),
                                               (np.float64, 0.5, 3.0)])
def test_read_matches_nibabel_get_fdata(tmp_path, dtype, slope, inter):
    rng = np.random.default_rng(0)
    xyz = (rng.normal(0, 300, (7, 9, 5)) + (100 if dtype == np.uint8 else 0)).clip(0 if dtype == np.uint8 else -2000)
    img = nib.Nifti1Image(xyz.astype(dtype), AFFINE)
    img.header.set_data_dtype(dtype)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    url = str(tmp_path / "case_0000.nii.gz")
    nib.save(img, url)
    case = read_case([url], 1)
    expected = nib.load(url).get_fdata(dtype=np.float32).transpose(2, 1, 0)
    # unscaled integers keep their type (cast on the compute device); everything else is float32
    assert case.data.dtype == (dtype if slope is None and np.dtype(dtype).kind in "iu" else np.float32)
    assert case.data.flags["C_CONTIGUOUS"] and case.data.shape == (1, 5, 9, 7)
    np.testing.assert_array_equal(case.data[0].astype(np.float32), expected)
    # what preprocessing gets on the compute device: float32, the same values
    from trtseg.transfer import to_device
    on_device = to_device(case.data, "cuda" if torch.cuda.is_available() else "cpu", torch.float32)
    assert on_device.dtype == torch.float32
    np.testing.assert_array_equal(on_device.cpu().numpy()[0], expected)
    if slope is not None:  # scaling applied, as SimpleITK does
        assert not np.array_equal(case.data[0], np.asarray(nib.load(url).dataobj.get_unscaled()).transpose(2, 1, 0))


def test_written_mask_reads_back_with_the_input_geometry(tmp_path):
    img = nib.Nifti1Image(np.zeros((7, 9, 5), np.int16), AFFINE)
    img.header.set_qform(AFFINE, code=1)
    img.header.set_sform(AFFINE, code=2)
    mask_zyx = np.random.default_rng(1).integers(0, 4, (5, 9, 7)).astype(np.uint8)
    url = str(tmp_path / "out" / "case.nii.gz")
    write_mask(url, mask_zyx, img.header, compress_level=1)
    back = nib.load(url)
    np.testing.assert_array_equal(np.asarray(back.dataobj).transpose(2, 1, 0), mask_zyx)
    assert back.get_data_dtype() == np.uint8
    np.testing.assert_allclose(back.affine, AFFINE)
    assert int(back.header["qform_code"]) == 1 and int(back.header["sform_code"]) == 2



def test_the_first_case_is_read_before_the_caller_iterates(monkeypatch):
    """predict.read_ahead starts reading the first case when it is called, so that the read overlaps the engines'
    start-up; then it yields each case's image in order, a failed read as None."""
    import threading

    from trtseg import pipeline, predict
    from trtseg.dataset import Case
    from trtseg.options import Settings

    started = threading.Event()

    def fake_read(case, models, settings, storage_options=None):
        started.set()
        if case.case_id == "bad":
            raise OSError("unreadable")
        return f"image of {case.case_id}"

    monkeypatch.setattr(pipeline, "read_image", fake_read)
    reads = predict.read_ahead([Case("a", ("a.nii.gz",)), Case("bad", ("b.nii.gz",)), Case("c", ("c.nii.gz",))],
                               None, Settings())
    assert started.wait(10), "nothing was read before the caller iterated"
    assert [image for image, _, _ in reads] == ["image of a", None, "image of c"]
    reads.close()

    # the engines failed to build after the first read started: closing without iterating stops the reader thread
    unread = predict.read_ahead([Case("a", ("a.nii.gz",)), Case("c", ("c.nii.gz",))], None, Settings())
    unread.close()
    deadline = time.monotonic() + 10
    while any(t.name.startswith("trtseg-read") for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name.startswith("trtseg-read") for t in threading.enumerate()), "the reader thread was left"


def test_a_case_prepared_ahead_gives_the_mask_and_report_of_one_prepared_in_line(small_model, tmp_path):
    """On a GPU, read_ahead's thread also prepares each case (copy, preprocess, padding) while the previous one is
    predicted. Forced here on the CPU: the same masks and geometry as preparing in the caller's thread, the read's
    seconds kept, and a case whose image cannot be read still fails with its file named."""
    import torch

    from trtseg import predict
    from trtseg.dataset import list_cases
    from trtseg.ensemble import ModelSet
    from trtseg.model_folder import load_model_folder
    from trtseg.options import Settings

    from conftest import write_case

    inp = tmp_path / "in"
    write_case(str(inp), "a", (30, 26, 14), (0.9, 1.1, 2.5), oblique_deg=10, seed=1)
    write_case(str(inp), "b", (22, 34, 17), (1.2, 0.8, 2.0), seed=2)
    (inp / "c_0000.nii.gz").write_bytes(b"not a nifti")
    models = ModelSet.of(load_model_folder(small_model, ["0"]))
    settings = Settings()
    predictor = predict.Predictor(models, settings)
    cases = list_cases(str(inp), 1)
    cpu = torch.device("cpu")
    masks = {}
    for label, prepare in (("ahead", True), ("in_line", False)):
        reads = predict.read_ahead(cases, models, settings, None, cpu, prepare=prepare)
        for case, (image, seconds, prepared) in zip(cases, reads):
            assert (prepared is not None) == (prepare and case.case_id != "c"), case.case_id
            if prepared is not None:
                assert prepared[0]["seconds"]["read"] == seconds > 0 and prepared[1].dim() == 4
            done = predictor.infer_case(case, None, image, seconds, prepared)
            if case.case_id == "c":
                assert done.status == "failed" and "c_0000.nii.gz" in done.error
                continue
            report = predictor.write(done, str(tmp_path / label))
            assert report.status == "ok", report.error
            masks[label, case.case_id] = nib.load(report.output)
        reads.close()
    for cid in ("a", "b"):
        ahead, in_line = masks["ahead", cid], masks["in_line", cid]
        assert np.array_equal(np.asarray(ahead.dataobj), np.asarray(in_line.dataobj)), cid
        assert np.allclose(ahead.affine, in_line.affine) and np.asarray(ahead.dataobj).any(), cid
