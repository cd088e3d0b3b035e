"""Scheduled processing of archives that change: the ledger redoes what changed and skips the rest, from listings
alone; shards split one dataset over independent jobs; headers that cannot be right are refused before reading.
On a real local Ray, on local disk and on moto's S3 server on loopback."""
from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from trtseg.cli import main

from conftest import write_case

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _report(out) -> dict:
    return json.load(open(os.path.join(out, "run_report.json")))


def _statuses(out) -> dict[str, tuple[str, str]]:
    return {c["case_id"]: (c["status"], c["reason"]) for c in _report(out)["cases"]}


def _ledger(out) -> list[str]:
    return sorted(os.listdir(os.path.join(out, ".trtseg", "ledger")))


@pytest.mark.parametrize("path", ["ray", "single"])
def test_replaced_deleted_and_resettled_cases_are_redone_and_the_rest_skipped(ray_local, small_model, tmp_path, path):
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    for i, cid in enumerate("abc"):
        write_case(inp, cid, (30, 28, 12), (1.0, 1.0, 2.0), seed=70 + i)
    run = ["predict", "-i", inp, "-o", out, "-m", small_model, "-f", "0", "--disable-tta", "--no-progress",
           *(["--cpu-actors", "1"] if path == "ray" else ["--single-process"])]
    assert main(run) == 0
    assert {k: v[0] for k, v in _statuses(out).items()} == {"a": "ok", "b": "ok", "c": "ok"}
    assert [n.split("~")[0] for n in _ledger(out)] == ["a", "b", "c"]
    before = np.asarray(nib.load(os.path.join(out, "b.nii.gz")).dataobj)
    # b: another scan under the same name (a re-export); c: its mask deleted by a user
    write_case(inp, "b", (30, 28, 12), (1.0, 1.0, 2.0), seed=99)
    os.unlink(os.path.join(out, "c.nii.gz"))
    assert main(run) == 0
    assert _statuses(out) == {"a": ("skipped", "unchanged"), "b": ("ok", "input changed"), "c": ("ok", "mask missing")}
    assert not np.array_equal(np.asarray(nib.load(os.path.join(out, "b.nii.gz")).dataobj), before), "stale mask kept"
    assert [n.split("~")[0] for n in _ledger(out)] == ["a", "b", "c"], "one entry per case: the old ones replaced"
    # a mask replaced by another file (here a's, over b's): no longer the one recorded, so redone
    shutil.copy(os.path.join(out, "a.nii.gz"), os.path.join(out, "b.nii.gz"))
    assert main(run) == 0
    assert _statuses(out) == {"a": ("skipped", "unchanged"), "b": ("ok", "mask replaced (not the one the ledger "
                                                                   "recorded)"), "c": ("skipped", "unchanged")}
    # other settings: every case redone, and --dry-run says so first
    r = subprocess.run([sys.executable, "-m", "trtseg.cli", *run[:-1 if path == "single" else -2],
                        *(["--single-process"] if path == "single" else []), "--step-size", "0.7", "--dry-run"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.count("settings changed") == 3, r.stdout + r.stderr
    assert main([*run, "--step-size", "0.7"]) == 0
    assert {v for v in _statuses(out).values()} == {("ok", "settings changed")}
    runs = os.listdir(os.path.join(out, ".trtseg", "runs"))
    assert len(runs) == 4 and all(n.endswith(".json") for n in runs), "every run's report is kept"


def test_hash_identity_sees_what_metadata_cannot(small_model, tmp_path):
    """A scan rewritten with the same size and modification time: the listing cannot tell, its bytes can."""
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    write_case(inp, "a", (30, 28, 12), (1.0, 1.0, 2.0), seed=71)
    f = os.path.join(inp, "a_0000.nii.gz")
    img = nib.load(f)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header), f)  # stored blocks, fixed size
    raw = gzip.decompress(open(f, "rb").read())
    open(f, "wb").write(gzip.compress(raw, compresslevel=0, mtime=0))
    run = ["predict", "-i", inp, "-o", out, "-m", small_model, "-f", "0", "--disable-tta", "--no-progress",
           "--single-process"]
    assert main([*run, "--input-identity", "hash"]) == 0
    st = os.stat(f)
    vox = np.frombuffer(raw, dtype=np.float32, offset=352).copy()
    vox[::7] += 500.0
    other = gzip.compress(raw[:352] + vox.tobytes(), compresslevel=0, mtime=0)
    assert len(other) == st.st_size
    open(f, "wb").write(other)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert main(run) == 0  # metadata identity (the default) was not recorded by the first run: redone as changed
    assert main(run) == 0
    assert _statuses(out) == {"a": ("skipped", "unchanged")}, "metadata cannot see a same-size, same-time rewrite"
    assert main([*run, "--input-identity", "hash"]) == 0
    assert _statuses(out)["a"][0] == "ok"
    vox[::5] += 300.0
    open(f, "wb").write(gzip.compress(raw[:352] + vox.tobytes(), compresslevel=0, mtime=0))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert main([*run, "--input-identity", "hash"]) == 0
    assert _statuses(out) == {"a": ("ok", "input changed")}


def test_two_shards_at_once_cover_every_case_exactly_once(small_model, tmp_path):
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    cases = [f"case{i:02d}" for i in range(10)]
    for i, cid in enumerate(cases):
        write_case(inp, cid, (20, 20, 8), (1.0, 1.0, 2.0), seed=80 + i)
    cmd = [sys.executable, "-m", "trtseg.cli", "predict", "-i", inp, "-o", out, "-m", small_model, "-f", "0",
           "--disable-tta", "--no-progress", "--single-process", "--engine", "torch"]
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout a pipe, block-buffered
    procs = [subprocess.Popen([*cmd, "--shard", f"{i}/2"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=buffered) for i in range(2)]
    done = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stdout + stderr
        # the command ends without the interpreter's teardown (trtseg.cli.entry): its summary still reaches a pipe
        assert re.search(r"^5/5 cases ok, 0 failed, 0 skipped, .* s; report: ", stdout, re.M), stdout + stderr
    for name in sorted(os.listdir(os.path.join(out, ".trtseg", "runs"))):
        done.append([c["case_id"] for c in json.load(open(os.path.join(out, ".trtseg", "runs", name)))["cases"]
                     if c["status"] == "ok"])
    assert len(done) == 2 and done[0] and done[1] and not set(done[0]) & set(done[1])
    assert sorted(done[0] + done[1]) == cases
    assert [n.split("~")[0] for n in _ledger(out)] == cases
    assert main(["predict", "-i", inp, "-o", out, "-m", small_model, "-f", "0", "--disable-tta", "--shard", "2/2",
                 "--single-process"]) == 2  # a shard outside 0..N-1


def test_replaced_scan_in_s3_is_redone_from_listings(ray_local, s3, small_model, tmp_path):
    opts, fs = s3
    inp = str(tmp_path / "in")
    for i, cid in enumerate("xy"):
        write_case(inp, cid, (30, 28, 12), (1.0, 1.0, 2.0), seed=90 + i)
    fs.put(inp + "/", "trtseg-bucket/sched_in/", recursive=True)
    run = ["predict", "-i", "s3://trtseg-bucket/sched_in", "-o", "s3://trtseg-bucket/sched_out", "-m", small_model,
           "-f", "0", "--disable-tta", "--cpu-actors", "1", "--no-progress", "--storage-options", json.dumps(opts)]
    assert main(run) == 0
    write_case(str(tmp_path / "other"), "y", (30, 28, 12), (1.0, 1.0, 2.0), seed=98)
    fs.put(str(tmp_path / "other" / "y_0000.nii.gz"), "trtseg-bucket/sched_in/y_0000.nii.gz")  # a new ETag
    assert main(run) == 0
    report = json.loads(fs.cat("trtseg-bucket/sched_out/run_report.json"))
    assert {c["case_id"]: (c["status"], c["reason"]) for c in report["cases"]} == {
        "x": ("skipped", "unchanged"), "y": ("ok", "input changed")}
    assert len(fs.ls("trtseg-bucket/sched_out/.trtseg/ledger")) == 2


def test_headers_that_cannot_be_right_are_refused_before_decompressing(small_model, tmp_path):
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    write_case(inp, "good", (30, 28, 12), (1.0, 1.0, 2.0), seed=5)
    # a header claiming 800^3 voxels over a stream of a few bytes (a gzip bomb's shape, or a cut file)
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((800, 800, 800))
    hdr.set_data_dtype(np.int16)
    hdr["vox_offset"] = 352
    with open(os.path.join(inp, "bomb_0000.nii.gz"), "wb") as f:
        f.write(gzip.compress(hdr.binaryblock + b"\0" * 4 + b"\0" * 1000))
    shutil.copy(os.path.join(inp, "good_0000.nii.gz"), os.path.join(inp, "big_0000.nii.gz"))
    assert main(["predict", "-i", inp, "-o", out, "-m", small_model, "-f", "0", "--disable-tta", "--single-process",
                 "--no-progress", "--memory-budget-gb", "0.00001"]) == 1
    cases = {c["case_id"]: c for c in _report(out)["cases"]}
    assert "bomb_0000.nii.gz" in cases["bomb"]["error"] and "refused before decompressing" in cases["bomb"]["error"]
    assert "more than --memory-budget-gb" in cases["big"]["error"], cases["big"]["error"]
    assert main(["predict", "-i", inp, "-o", out, "-m", small_model, "-f", "0", "--disable-tta", "--single-process",
                 "--no-progress"]) == 1
    cases = {c["case_id"]: c for c in _report(out)["cases"]}
    assert cases["good"]["status"] == "ok" and cases["big"]["status"] == "ok"
    assert "gzip stream holds" in cases["bomb"]["error"] and "\n" not in cases["bomb"]["error"], cases["bomb"]


def test_a_starting_job_removes_only_the_parts_of_writers_that_are_gone(tmp_path):
    """A shard starting into a shared output must not delete another live shard's temporary files; a killed run's
    are removed."""
    from trtseg import storage
    out = str(tmp_path)
    live = f".a.nii.gz.{storage._WRITER}.0a1b.part"
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    dead = f".b.nii.gz.{storage._HOST}-{ended.pid}.0a1b.part"
    unnamed = ".c.nii.gz.0a1b2c3d.part"  # an earlier release's name: no writer to ask
    for name in (live, dead, unnamed):
        open(os.path.join(out, name), "w").close()
    assert storage.remove_stale_parts(out) == 2
    assert os.listdir(out) == [live]
