"""Memory pressure: an out-of-memory error on a tile batch halves the batch and retries down to one tile; a volume
too large for the configured budget fails with a clear error before inference (it is not processed in slabs)."""
from __future__ import annotations

import json

import pytest
import torch

from trtseg.accel.engine import Engine
from trtseg.accel.torch_engine import TorchEngine
from trtseg.accel.patches import random_patches
from trtseg.cli import main
from trtseg.infer import predict_tiles
from trtseg.model_folder import load_model_folder

from conftest import write_case


class TightEngine(Engine):
    """A real engine that runs out of memory above ``fits`` tiles per call, as a small GPU would."""

    def __init__(self, inner: Engine, fits: int):
        self.inner, self.fits, self.device, self.calls = inner, fits, inner.device, []

    def infer(self, batch):
        self.calls.append(batch.shape[0])
        if batch.shape[0] > self.fits:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate for {batch.shape[0]} tiles")
        return self.inner.infer(batch)


def test_oom_halves_the_batch_and_gives_the_same_logits(small_model):
    model = load_model_folder(small_model, ["0"])
    tiles = torch.from_numpy(random_patches(model, 5))
    plain = TorchEngine(model.build_network("0"))
    tight = TightEngine(TorchEngine(model.build_network("0")), fits=2)
    expected = predict_tiles(plain, tiles, (0, 1, 2))
    got = predict_tiles(tight, tiles, (0, 1, 2))
    # the same logits up to float32 summation order: on some CPUs (an AVX2-only AMD EPYC here) oneDNN picks its
    # convolution kernels by batch size, and a batch of 2 sums in another order than one of 5 (seen: 4.4e-5 on
    # logits up to 67); a lost, repeated or misplaced tile is off by the logits' own scale
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    assert tight.calls[:3] == [5, 2, 2] and max(tight.calls[3:]) <= 2, tight.calls  # halved once, then kept
    with pytest.raises(torch.OutOfMemoryError):
        predict_tiles(TightEngine(TorchEngine(model.build_network("0")), fits=0), tiles[:1], None)


def test_a_volume_over_the_memory_budget_fails_clearly(small_model, tmp_path):
    inp, out = str(tmp_path / "in"), tmp_path / "out"
    write_case(inp, "huge", (160, 150, 60), (0.5, 0.5, 1.0), seed=5)
    write_case(inp, "small", (30, 28, 12), (1.0, 1.0, 2.0), seed=6)
    assert main(["predict", "-i", inp, "-o", str(out), "-m", small_model, "--memory-budget-gb", "0.02",
                 "--no-progress"]) == 1
    by_id = {c["case_id"]: c for c in json.load(open(out / "run_report.json"))["cases"]}
    assert by_id["small"]["status"] == "ok"
    err = by_id["huge"]["error"]
    assert by_id["huge"]["status"] == "failed" and "huge_0000.nii.gz" in err and "--memory-budget-gb 0.02" in err
    assert not (out / "huge.nii.gz").exists()
