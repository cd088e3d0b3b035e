"""Shared fixtures: synthetic nnU-Net v2 model folders and NIfTI volumes with awkward geometry, and nnU-Net's own
predictor as the reference."""
from __future__ import annotations

import os
import socket
import re
import tempfile

import nibabel as nib
import numpy as np
import pytest
import torch

from trtseg import synthetic as syn

torch.set_num_threads(min(2, os.cpu_count() or 1))
if not torch.cuda.is_available():  # Triton's interpreter runs the fused kernels (trtseg/accel/rewrites/triton_fusion.py) on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")
# exported ONNX graphs and engines of the tests' models go to a throw-away cache, not ~/.cache/trtseg
os.environ.setdefault("TRTSEG_CACHE", tempfile.mkdtemp(prefix="trtseg_test_cache_"))


def nnunet_predict(model_dir: str, cases: list[list[str]], out_dir: str, folds, use_mirroring: bool = True,
                   step_size: float = 0.5) -> list[str]:
    """Runs nnunetv2's nnUNetPredictor (CPU) on ``cases``; returns the output files."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    os.makedirs(out_dir, exist_ok=True)
    p = nnUNetPredictor(tile_step_size=step_size, use_mirroring=use_mirroring, device=torch.device("cpu"),
                        allow_tqdm=False)
    p.initialize_from_trained_model_folder(model_dir, use_folds=tuple(folds))
    outs = [os.path.join(out_dir, re.sub(r"_0000\.(nii\.gz|nii|nrrd|mha|mhd)$", "", os.path.basename(c[0])))
            for c in cases]
    p.predict_from_files_sequential(cases, outs, save_probabilities=False, overwrite=True)
    return [o + p.dataset_json["file_ending"] for o in outs]


def run_ray_cli(args, *, attempts: int = 6, **kwargs) -> "subprocess.CompletedProcess[str]":  # noqa: F821
    """Runs a `ray ...` command line (subprocess.run arguments); a `ray job submit` refused because the head's job
    agent has not registered yet (Ray waits only 10 s for it, which a loaded 2-core machine can exceed) is tried
    again, since the refusal happens before any job exists. Any other outcome is returned as it is."""
    import subprocess
    import time
    for _ in range(attempts):
        r = subprocess.run(args, capture_output=True, text=True, **kwargs)
        if r.returncode == 0 or "No available agent to submit job" not in r.stdout + r.stderr:
            return r
        time.sleep(5)
    return r


def voxel_agreement(a_path: str, b_path: str) -> float:
    a = np.asarray(nib.load(a_path).dataobj)
    b = np.asarray(nib.load(b_path).dataobj)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a == b).mean())


def write_case(folder: str, case_id: str, shape_xyz, spacing_xyz, oblique_deg=0.0, seed=0, zero_border=0,
               channels=1) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    files = []
    for c in range(channels):
        vol = syn.ct_like_volume(shape_xyz, seed=seed + 17 * c, zero_border=zero_border)
        files.append(syn.save_nifti(os.path.join(folder, f"{case_id}_{c:04d}.nii.gz"), vol,
                                    syn.affine_for(spacing_xyz, oblique_deg, origin=(-12.5, 30.0, 7.25))))
    return files


@pytest.fixture(scope="session")
def small_model(tmp_path_factory) -> str:
    """PlainConvUNet, 3 labels, anisotropic target spacing, patch (24, 32, 40), folds 0 and 1."""
    d = tmp_path_factory.mktemp("model_small")
    return syn.make_model_folder(str(d), folds=(0, 1), patch_size=(24, 32, 40), spacing=(2.0, 1.0, 1.0),
                                 features=(4, 8, 16))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on loopback; yields storage options that point s3fs at it."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    opts = {"key": "AKIATESTKEY0001", "secret": "s3cr3t-never-printed", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}", "region_name": "us-east-1"}}
    import boto3
    import s3fs
    boto3.client("s3", endpoint_url=opts["client_kwargs"]["endpoint_url"], aws_access_key_id=opts["key"],
                 aws_secret_access_key=opts["secret"], region_name="us-east-1").create_bucket(Bucket="trtseg-bucket")
    fs = s3fs.S3FileSystem(**opts)
    yield opts, fs
    server.stop()


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray for the module; the Ray jobs of its tests join it instead of starting their own."""
    import ray
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()
