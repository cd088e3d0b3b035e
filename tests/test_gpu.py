"""GPU paths that CI (no GPU) skips with the reason: the PyTorch CUDA engine (eager, fp16, CUDA graphs), the CUDA
predictor against the CPU predictor, and the Ray job's GPU actors."""
from __future__ import annotations


import nibabel as nib
import numpy as np
import pytest
import torch

from accel.engines import TorchEngine
from accel.patches import random_patches
from trtseg.dataset import list_cases
from trtseg.model import load_model_folder
from trtseg.predict import Predictor, Settings

from conftest import write_case

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")]


def test_cuda_graphs_replay_gives_the_eager_logits(small_model):
    model = load_model_folder(small_model, ["0"])
    x = torch.from_numpy(random_patches(model, 2)).cuda()
    eager = TorchEngine(model.build_network("0"), "cuda", "fp32")
    graphs = TorchEngine(model.build_network("0"), "cuda", "fp32", cuda_graphs=True)
    a = eager.infer(x)
    for _ in range(2):  # capture, then replay
        b = graphs.infer(x)
    assert torch.allclose(a, b, atol=1e-3), (a - b).abs().max()
    assert graphs.infer(x[:1]).shape == a[:1].shape  # a second batch shape gets its own graph


def test_fp16_weights_keep_norms_fp32_and_track_autocast(small_model):
    model = load_model_folder(small_model, ["0"])
    x = torch.from_numpy(random_patches(model, 2)).cuda()
    ref = TorchEngine(model.build_network("0"), "cuda", "fp32").infer(x)
    fast = TorchEngine(model.build_network("0"), "cuda", "fp16", channels_last=True, half_weights=True)
    norms = [m for m in fast.network.modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    assert norms and all(p.dtype == torch.float32 for m in norms for p in m.parameters())
    out = fast.infer(x)
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.999


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_predictor_gives_the_cpu_masks(small_model, tmp_path, precision):
    write_case(str(tmp_path / "in"), "g", (70, 61, 23), (0.8, 0.8, 3.1), oblique_deg=20, zero_border=3)
    model = load_model_folder(small_model)
    case = list_cases(str(tmp_path / "in"), 1)[0]
    cpu = Predictor(model, Settings(device="cpu", engine="torch")).predict_case(case, str(tmp_path / "cpu"))
    gpu = Predictor(model, Settings(device="cuda", engine="torch", precision=precision, cuda_graphs=True)).predict_case(
        case, str(tmp_path / "gpu"))
    a = np.asarray(nib.load(cpu.output).dataobj)
    b = np.asarray(nib.load(gpu.output).dataobj)
    assert (a == b).mean() >= 0.999
