"""The S3 server stops for a few seconds, at the start of a run and in the middle of one: storage calls retry with
backoff, the run completes, and the masks are those of an undisturbed run."""
from __future__ import annotations

import json
import os
import socket
import threading
import time

import nibabel as nib
import numpy as np

from trtseg.cli import main

from conftest import write_case


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_s3_outages_are_ridden_out(small_model, tmp_path, monkeypatch):
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    monkeypatch.setenv("TRTSEG_STORAGE_BACKOFF", "0.5")  # Ray workers read it at import: 0.5, 1, 2, 4 s
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    opts = {"key": "AKIAFAULTS", "secret": "faults-secret", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}",
                                                                            "region_name": "us-east-1"}}
    boto3.client("s3", endpoint_url=opts["client_kwargs"]["endpoint_url"], aws_access_key_id="x",
                 aws_secret_access_key="x", region_name="us-east-1").create_bucket(Bucket="faults")
    inp = str(tmp_path / "in")
    for i in range(4):
        write_case(inp, f"c{i}", (60, 56, 22), (0.8, 0.8, 2.5), seed=60 + i)
    fs = s3fs.S3FileSystem(**opts)
    fs.put(inp + "/", "faults/in/", recursive=True)
    args = ["predict", "-i", "s3://faults/in", "-m", small_model, "--cpu-actors", "1", "--max-cases-in-flight", "1",
            "--storage-options", json.dumps(opts), "--no-progress"]
    try:
        assert main(args + ["-o", str(tmp_path / "calm")]) == 0
        outages = []

        def outage(seconds: float) -> None:
            server.stop()
            outages.append(time.time())
            time.sleep(seconds)
            server.start()

        def mid_run() -> None:  # the second outage starts once the first mask is written
            out = tmp_path / "out"
            while not (out.exists() and any(f.endswith(".nii.gz") for f in os.listdir(out))):
                time.sleep(0.05)
            outage(3.0)

        server.stop()  # the first outage: the run starts while S3 is down
        threading.Timer(3.0, server.start).start()
        watcher = threading.Thread(target=mid_run, daemon=True)
        watcher.start()
        assert main(args + ["-o", str(tmp_path / "out")]) == 0
        watcher.join(30)
        assert outages, "the mid-run outage did not happen"
        report = json.load(open(tmp_path / "out" / "run_report.json"))
        assert [c["status"] for c in report["cases"]] == ["ok"] * 4
        for i in range(4):
            a = np.asarray(nib.load(str(tmp_path / "calm" / f"c{i}.nii.gz")).dataobj)
            b = np.asarray(nib.load(str(tmp_path / "out" / f"c{i}.nii.gz")).dataobj)
            assert np.array_equal(a, b)
    finally:
        server.stop()


def test_retry_policy(monkeypatch):
    from trtseg import storage

    monkeypatch.setattr(storage, "RETRY_BASE_SECONDS", 0.01)
    calls = []

    def flaky():
        calls.append(time.perf_counter())
        if len(calls) < 3:
            raise ConnectionError("connection refused")
        return "ok"

    assert storage.retrying(flaky) == "ok" and len(calls) == 3
    calls.clear()

    def down():
        calls.append(time.perf_counter())
        raise ConnectionError("connection refused")

    try:
        storage.retrying(down)
    except ConnectionError:
        pass
    assert len(calls) == storage.RETRY_ATTEMPTS, "a lasting fault is retried a bounded number of times"
    gaps = np.diff(calls)
    assert all(b > a for a, b in zip(gaps, gaps[1:])), f"backoff must grow: {gaps}"
    calls.clear()

    def missing():
        calls.append(1)
        raise FileNotFoundError("no such key")

    try:
        storage.retrying(missing)
    except FileNotFoundError:
        pass
    assert calls == [1], "a missing file is not retried"


def test_an_unreadable_s3_case_fails_alone_with_its_cause(small_model, tmp_path):
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    opts = {"key": "AKIAFAULTS", "secret": "faults-secret", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}",
                                                                            "region_name": "us-east-1"}}
    try:
        boto3.client("s3", endpoint_url=opts["client_kwargs"]["endpoint_url"], aws_access_key_id="x",
                     aws_secret_access_key="x", region_name="us-east-1").create_bucket(Bucket="faults2")
        fs = s3fs.S3FileSystem(**opts)
        src = write_case(str(tmp_path / "src"), "good", (40, 36, 14), (1.0, 1.0, 2.0), seed=3)[0]
        fs.put(src, "faults2/in/good_0000.nii.gz")
        fs.pipe("faults2/in/broken_0000.nii.gz/part", b"x")  # listed as a case, but no object to read
        out = tmp_path / "out"
        rc = main(["predict", "-i", "s3://faults2/in", "-o", str(out), "-m", small_model, "--cpu-actors", "1",
                   "--storage-options", json.dumps(opts), "--no-progress"])
        assert rc == 1
        by_id = {c["case_id"]: c for c in json.load(open(out / "run_report.json"))["cases"]}
        assert by_id["good"]["status"] == "ok"
        err = by_id["broken"]["error"]
        assert by_id["broken"]["status"] == "failed" and "broken_0000.nii.gz" in err and "\n" not in err
        assert "faults-secret" not in err
        assert sorted(os.listdir(out)) == [".trtseg", "good.nii.gz", "run_report.json"]
    finally:
        server.stop()
