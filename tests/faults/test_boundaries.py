"""Case ids come from file names: a name with '..', odd characters or a leading dot cannot write outside the
output root, and two names that map to one id are refused rather than overwriting each other."""
from __future__ import annotations

import json
import os
import shutil

from trtseg.cli import main
from trtseg.dataset import list_cases, safe_case_id

from conftest import write_case


def test_odd_names_stay_inside_the_output_root(small_model, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "root" / "out"
    src = write_case(str(tmp_path / "src"), "x", (24, 22, 10), (1.0, 1.0, 2.0), seed=2)[0]
    inp.mkdir()
    for name in ["..nii.gz", "...._0000.nii.gz", "a b#c?_0000.nii.gz", "évil$(rm)_0000.nii.gz", "ok_0000.nii.gz"]:
        shutil.copy(src, inp / name)
    cases = list_cases(str(inp), 1)
    # names that start with a dot are hidden files (.DS_Store, temporary files): never cases
    assert sorted(c.case_id for c in cases) == ["_vil__rm_", "a_b_c_", "ok"]
    for hostile in ["..", ".", "../../etc/passwd", ".hidden", "a/b", "x\\y", "", "\x00"]:
        cid = safe_case_id(hostile)
        assert cid and cid not in (".", "..") and not cid.startswith(".") and "/" not in cid and "\\" not in cid
    assert main(["predict", "-i", str(inp), "-o", str(out), "-m", small_model, "--no-progress"]) == 0
    written = sorted(os.listdir(out))
    assert [w for w in written if w.endswith(".nii.gz")] == ["_vil__rm_.nii.gz", "a_b_c_.nii.gz", "ok.nii.gz"]
    assert sorted(os.listdir(tmp_path / "root")) == ["out"], "nothing may be written beside the output root"
    report = json.load(open(out / "run_report.json"))
    assert all(c["output"].startswith(str(out) + "/") for c in report["cases"])


def test_two_names_for_one_id_are_refused(small_model, tmp_path):
    src = write_case(str(tmp_path / "src"), "x", (24, 22, 10), (1.0, 1.0, 2.0), seed=2)[0]
    (tmp_path / "in").mkdir()
    shutil.copy(src, tmp_path / "in" / "a b_0000.nii.gz")
    shutil.copy(src, tmp_path / "in" / "a_b_0000.nii.gz")
    assert {c.problem is not None for c in list_cases(str(tmp_path / "in"), 1)} == {True}
