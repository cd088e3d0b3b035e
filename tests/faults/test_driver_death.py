"""The driver is killed mid-run (SIGKILL to its whole process group, the local Ray with it). Rerunning the same
command finishes only the missing cases, and nothing of the killed run is left half-written."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np

from conftest import write_case


def test_rerun_after_driver_death_finishes_only_the_missing_cases(small_model, tmp_path):
    inp, out, calm = str(tmp_path / "in"), tmp_path / "out", tmp_path / "calm"
    for i in range(5):
        write_case(inp, f"c{i}", (70, 64, 24), (0.8, 0.8, 2.5), seed=50 + i)
    trtseg = os.path.join(os.path.dirname(sys.executable), "trtseg")
    cmd = [trtseg, "predict", "-i", inp, "-m", small_model, "--cpu-actors", "1", "--max-cases-in-flight", "1",
           "--no-progress"]
    assert subprocess.run(cmd + ["-o", str(calm)], capture_output=True).returncode == 0
    proc = subprocess.Popen(cmd + ["-o", str(out)], start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (out.exists() and any(f.endswith(".nii.gz") for f in os.listdir(out))):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), "stop", "--force"], capture_output=True)
    masks_before = sorted(f for f in os.listdir(out) if f.endswith(".nii.gz"))
    assert 1 <= len(masks_before) < 5, f"the kill must land mid-run, not {masks_before}"
    # the ledger holds an entry only for a committed mask (written after it): a consistent record of what is done
    ledger = out / ".trtseg" / "ledger"
    recorded = sorted(n.split("~")[0] + ".nii.gz" for n in os.listdir(ledger)) if ledger.exists() else []
    assert set(recorded) <= set(masks_before) and len(masks_before) - len(recorded) <= 1, (recorded, masks_before)
    from trtseg import ledger as trtseg_ledger
    masks = trtseg_ledger.outputs(str(out))
    for n in os.listdir(ledger) if ledger.exists() else []:
        assert n.removesuffix(".json").split("~")[3] == masks[n.split("~")[0] + ".nii.gz"], n  # the mask it recorded
    assert subprocess.run(cmd + ["-o", str(out)], capture_output=True).returncode == 0
    report = json.load(open(out / "run_report.json"))
    status = {c["case_id"]: c["status"] for c in report["cases"]}
    # the rerun finishes only what the ledger does not hold (a mask committed in the instant before the kill,
    # without its entry yet, is redone: only recorded work is trusted)
    assert sorted(k + ".nii.gz" for k, v in status.items() if v == "skipped") == recorded
    assert all(v in ("ok", "skipped") for v in status.values()) and len(status) == 5
    assert sorted(os.listdir(out)) == sorted([f"c{i}.nii.gz" for i in range(5)] + [".trtseg", "run_report.json"]), \
        "no temporary or partial file may remain"
    for i in range(5):
        a = np.asarray(nib.load(str(calm / f"c{i}.nii.gz")).dataobj)
        b = np.asarray(nib.load(str(out / f"c{i}.nii.gz")).dataobj)
        assert np.array_equal(a, b), f"c{i}"
