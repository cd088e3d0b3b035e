"""Helpers shared by the benchmark scripts: machine description, medians, result files."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess

import torch

from trtseg import synthetic as syn


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "cpu": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                             "--format=csv,noheader"], capture_output=True, text=True,
                                            timeout=10).stdout.strip()
    except Exception:
        pass
    return info


def median_stages(runs: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for r in runs for k in r})
    return {k: round(statistics.median(r.get(k, 0.0) for r in runs), 4) for k in keys}


def save(result: dict, path: str | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)


def write_ct(path: str, shape_xyz=(512, 512, 240), seed: int = 100) -> None:
    """The GPU benchmarks' input: a CT-like int16 volume of ``shape_xyz`` (x, y, z) at 0.7 x 0.7 x 1.25 mm."""
    syn.save_nifti(path, syn.ct_like_volume(shape_xyz, seed=seed), syn.affine_for((0.7, 0.7, 1.25)))
