"""The Ray job: a real local Ray with two actors, `ray job submit` against `ray start --head`, a real S3 API on
loopback (moto's server, s3fs as the client), and storage that fails."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from trtseg.cli import main

from conftest import _free_port, run_ray_cli, write_case

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("job_in"))
    write_case(d, "big", (90, 80, 30), (0.8, 0.8, 2.5), oblique_deg=12, seed=31, zero_border=2)
    write_case(d, "small", (30, 28, 12), (1.0, 1.0, 2.0), seed=32)
    return d


def masks(folder):
    return {f: np.asarray(nib.load(os.path.join(folder, f)).dataobj) for f in sorted(os.listdir(folder)) if f.endswith(".nii.gz")}


def test_ray_job_matches_single_process_and_reruns_skip(ray_local, small_model, inputs, tmp_path):
    common = ["-i", inputs, "-m", small_model, "--engine", "onnxruntime", "--no-progress"]
    assert main(["predict", *common, "-o", str(tmp_path / "single"), "--single-process"]) == 0
    assert main(["predict", *common, "-o", str(tmp_path / "ray32"), "--cpu-actors", "2", "--partials", "fp32",
                 "--tiles-per-task", "4"]) == 0
    assert main(["predict", *common, "-o", str(tmp_path / "ray16"), "--cpu-actors", "2"]) == 0
    single, ray32, ray16 = masks(tmp_path / "single"), masks(tmp_path / "ray32"), masks(tmp_path / "ray16")
    assert set(single) == set(ray32) == set(ray16) == {"big.nii.gz", "small.nii.gz"}
    for name in single:
        assert np.array_equal(single[name], ray32[name]), f"{name}: fp32 partials must give the single-process mask"
        assert (single[name] == ray16[name]).mean() >= 0.9999, name
    report = json.load(open(tmp_path / "ray32" / "run_report.json"))
    big = next(c for c in report["cases"] if c["case_id"] == "big")
    assert len(big["actors"]) == 2 and sum(big["actors"].values()) == big["tiles"], big["actors"]
    assert big["object_store_bytes"]["volume"] > 0 and big["object_store_bytes"]["partials"] > 0
    assert set(big["seconds"]) >= {"read", "preprocess", "infer", "export", "write"}
    assert report["job"]["actors"] == 2 and len(report["actors"]) == 2
    # exports (finalize, take_partial) run on their own thread, beside the next case's tiles, not queued behind them
    # the driver's warm-up call runs on the tile thread: PyTorch keeps cuDNN's autotuning per thread
    for a in report["actors"]:
        assert a["threads"]["export"] != a["threads"]["tiles"], a["threads"]
        assert a["threads"]["warm_up"] == a["threads"]["tiles"], a["threads"]

    # a rerun skips both cases and leaves the masks alone; --overwrite redoes them; --dry-run only lists
    before = {f: os.stat(tmp_path / "ray32" / f).st_mtime_ns for f in single}
    assert main(["predict", *common, "-o", str(tmp_path / "ray32"), "--cpu-actors", "2", "--partials", "fp32"]) == 0
    rerun = json.load(open(tmp_path / "ray32" / "run_report.json"))
    assert [c["status"] for c in rerun["cases"]] == ["skipped", "skipped"]
    assert before == {f: os.stat(tmp_path / "ray32" / f).st_mtime_ns for f in single}
    # other settings made these masks: not skipped
    assert main(["predict", *common, "-o", str(tmp_path / "ray32"), "--disable-tta", "--dry-run"]) == 0
    assert main(["predict", *common, "-o", str(tmp_path / "ray32"), "--overwrite", "--limit", "1"]) == 0
    last = json.load(open(tmp_path / "ray32" / "run_report.json"))
    assert [(c["case_id"], c["status"]) for c in last["cases"]] == [("big", "ok")]

    # the single process stamps, skips and overwrites the same way, and reports in the same schema
    single_dir = tmp_path / "single"
    before = {f: os.stat(single_dir / f).st_mtime_ns for f in single}
    assert main(["predict", *common, "-o", str(single_dir), "--single-process"]) == 0
    again = json.load(open(single_dir / "run_report.json"))
    assert [c["status"] for c in again["cases"]] == ["skipped", "skipped"]
    assert before == {f: os.stat(single_dir / f).st_mtime_ns for f in single}
    assert set(again) == set(rerun) and set(again["summary"]) <= set(rerun["summary"])
    assert set(again["cases"][0]) == set(rerun["cases"][0])
    # a mask the single process made is one the Ray job skips: one stamp
    assert main(["predict", *common, "-o", str(single_dir), "--cpu-actors", "1"]) == 0
    assert [c["status"] for c in json.load(open(single_dir / "run_report.json"))["cases"]] == ["skipped", "skipped"]
    assert main(["predict", *common, "-o", str(single_dir), "--single-process", "--overwrite"]) == 0
    assert [c["status"] for c in json.load(open(single_dir / "run_report.json"))["cases"]] == ["ok", "ok"]


def test_an_int8_ray_job_calibrates_on_its_input_and_matches_the_single_process(ray_local, small_model, inputs,
                                                                                  tmp_path):
    """--precision int8 (quant8's reference on CPU actors): the Ray job's actors calibrate on the job's input and
    gate the engine, the single process then loads that calibration from the engine cache, and both give the same
    masks."""
    common = ["-i", inputs, "-m", small_model, "--engine", "torch", "--precision", "int8", "--max-dice-drop", "0.3",
              "--engine-cache", str(tmp_path / "cache"), "--no-progress", "-f", "0"]
    assert main(["predict", *common, "-o", str(tmp_path / "ray"), "--cpu-actors", "2", "--partials", "fp32"]) == 0
    assert main(["predict", *common, "-o", str(tmp_path / "single"), "--single-process"]) == 0
    ray_masks, single = masks(tmp_path / "ray"), masks(tmp_path / "single")
    assert set(single) == set(ray_masks) == {"big.nii.gz", "small.nii.gz"}
    for name in single:
        assert np.array_equal(single[name], ray_masks[name]), name
    ray_engine = json.load(open(tmp_path / "ray" / "run_report.json"))["engine"]
    single_engine = json.load(open(tmp_path / "single" / "run_report.json"))["engine"]
    assert ray_engine["precision"] == "int8" and ray_engine["quantized_convolutions"] > 4
    assert ray_engine["calibration"]["calibration"] == inputs and ray_engine["calibration"]["accepted"]
    assert single_engine["calibration"]["from"] == "cache"
    assert single_engine["calibration"]["entry"] == ray_engine["calibration"]["entry"]


def test_dry_run_lists_without_running(ray_local, small_model, inputs, tmp_path, capsys):
    assert main(["predict", "-i", inputs, "-o", str(tmp_path / "o"), "-m", small_model, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would run big" in out and "would run small" in out
    assert not (tmp_path / "o").exists()


def test_a_case_failing_halfway_fails_alone_without_partial_output(ray_local, small_model, inputs, tmp_path):
    out = tmp_path / "out"
    (out / "big.nii.gz").mkdir(parents=True)  # the write of 'big' fails after inference
    rc = main(["predict", "-i", inputs, "-o", str(out), "-m", small_model, "--cpu-actors", "2", "--no-progress"])
    assert rc == 1
    by_id = {c["case_id"]: c for c in json.load(open(out / "run_report.json"))["cases"]}
    assert by_id["small"]["status"] == "ok"
    assert by_id["big"]["status"] == "failed" and "big_0000.nii.gz" in by_id["big"]["error"]
    assert "IsADirectoryError" in by_id["big"]["error"]
    assert sorted(os.listdir(out)) == [".trtseg", "big.nii.gz", "run_report.json", "small.nii.gz"]  # no temporary files
    assert os.listdir(out / "big.nii.gz") == []


def test_inputs_outputs_model_and_engine_cache_in_s3(ray_local, s3, small_model, inputs, tmp_path, capsys):
    opts, fs = s3
    fs.put(inputs + "/", "trtseg-bucket/in/", recursive=True)
    fs.put(small_model + "/", "trtseg-bucket/model/", recursive=True)
    args = ["predict", "-i", "s3://trtseg-bucket/in", "-o", "s3://trtseg-bucket/out", "-m", "s3://trtseg-bucket/model",
            "--engine", "onnxruntime", "--engine-cache", "s3://trtseg-bucket/cache", "--cpu-actors", "2",
            "--storage-options", json.dumps(opts), "--no-progress", "--log-json"]
    assert main(args) == 0
    assert fs.exists("trtseg-bucket/out/big.nii.gz") and fs.exists("trtseg-bucket/out/small.nii.gz")
    assert fs.glob("trtseg-bucket/cache/onnx/**/*.onnx"), "the engine cache lives in the bucket"
    fs.get("trtseg-bucket/out/big.nii.gz", str(tmp_path / "big.nii.gz"))
    assert nib.load(str(tmp_path / "big.nii.gz")).shape == (90, 80, 30)
    report = json.loads(fs.cat("trtseg-bucket/out/run_report.json"))
    assert main(args) == 0
    rerun = json.loads(fs.cat("trtseg-bucket/out/run_report.json"))
    assert [c["status"] for c in rerun["cases"]] == ["skipped", "skipped"]
    text = capsys.readouterr()
    for blob in (json.dumps(report), json.dumps(rerun), text.out, text.err):
        assert opts["secret"] not in blob and opts["key"] not in blob, "credentials leaked"


def test_storage_errors_are_clear(ray_local, s3, small_model, inputs, tmp_path, capsys):
    opts, fs = s3
    # a missing bucket for the output: every case fails with the cause, nothing is written
    rc = main(["predict", "-i", inputs, "-o", "s3://no-such-bucket/out", "-m", small_model, "--cpu-actors", "1",
               "--storage-options", json.dumps(opts), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "s3://no-such-bucket/out: output location is not writable" in err, err
    assert not fs.exists("no-such-bucket"), "a missing bucket must never be created"
    # an input URL that does not exist
    rc = main(["predict", "-i", "s3://trtseg-bucket/nothing-here", "-o", str(tmp_path / "o"), "-m", small_model,
               "--storage-options", json.dumps(opts), "--no-progress"])
    assert rc == 2 and "nothing-here" in capsys.readouterr().err
    # a wrong storage option (an endpoint where no server listens): a clear error, and no secret in it
    bad = {**opts, "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{_free_port()}"}, "config_kwargs": {"retries": {"max_attempts": 1}}}
    rc = main(["predict", "-i", "s3://trtseg-bucket/in", "-o", str(tmp_path / "o2"), "-m", small_model,
               "--storage-options", json.dumps(bad), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "trtseg: error:" in err and opts["secret"] not in err


def test_ray_job_submit_to_a_ray_head(small_model, inputs, tmp_path):
    import ray
    if ray.is_initialized():
        ray.shutdown()
    bindir = os.path.dirname(sys.executable)
    # the cluster's nodes have trtseg installed (a venv here, an image on a real cluster): its scripts on PATH,
    # also when the tests run without an activated venv (make test)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    ray_bin = os.path.join(bindir, "ray")
    port, dash = _free_port(), _free_port()
    subprocess.run([ray_bin, "start", "--head", f"--port={port}", f"--dashboard-port={dash}", "--num-cpus=4",
                    "--dashboard-host=127.0.0.1", "--disable-usage-stats"], check=True, env=env, capture_output=True)
    try:
        out = tmp_path / "out"
        cmd = [ray_bin, "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", ".", "--",
               "trtseg", "predict", "-i", inputs, "-o", str(out), "-m", small_model, "--cpu-actors", "2", "--no-progress"]
        r = run_ray_cli(cmd, cwd=ROOT, env=env, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "succeeded" in (r.stdout + r.stderr).lower()
        report = json.load(open(out / "run_report.json"))
        assert report["summary"]["ok"] == 2 and report["job"]["ray_address"] != "local"
        assert os.path.exists(out / "big.nii.gz") and os.path.exists(out / "small.nii.gz")
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True)


def test_gpu_actor_count_leaves_the_prepare_tasks_their_gpu_share():
    """Five 0.2-GPU actors would take the whole GPU and leave every 0.1-GPU prepare task (and so every case) waiting
    for ever: the driver packs actors per GPU and keeps one GPU's share for the tasks."""
    from trtseg.jobs.driver import gpu_actor_count
    assert [gpu_actor_count(1, g, 0.1) for g in (0.8, 0.4, 0.2)] == [1, 2, 4]
    assert gpu_actor_count(1, 0.25, 0.0) == 4 and gpu_actor_count(8, 0.5, 0.1) == 15 and gpu_actor_count(8, 0.5, 0) == 16
    assert gpu_actor_count(4, 1, 0.1) == 3 and gpu_actor_count(4, 2, 0) == 2
    with pytest.raises(ValueError, match="--task-gpus 0"):
        gpu_actor_count(1, 1, 0.1)
