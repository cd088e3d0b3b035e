"""The engine interface: one narrow contract between the pipeline and whatever runs the network.

An engine takes a batch of tiles (b, c, z, y, x) float32 on its device and returns logits (b, k, z, y, x) float32
on the same device. It owns whatever state it needs (network, execution context, stream) for its whole life.
One module per backend implements it (``torch_engine``, ``onnxruntime_engine``, ``tensorrt_runtime``,
``pycuda_runtime``); ``trtseg.accel.engines.create_engines`` picks and builds them, importing each only when asked for.
"""
from __future__ import annotations

import abc
import time

import torch


class Engine(abc.ABC):
    """Runs a segmentation network on batches of tiles.

    name: backend name for reports ("torch", "onnxruntime", "tensorrt")
    device: where input and output tensors live
    max_batch: the largest batch the engine accepts (None: any)
    oom_batch_limit: the batch size an out-of-memory error halved it to (trtseg.infer.run_engine), kept for the
        engine's later batches; None until one happens
    """

    name: str = "engine"
    device: torch.device = torch.device("cpu")
    max_batch: int | None = None
    oom_batch_limit: int | None = None
    fast_path: dict | None = None  # what trtseg.accel.fast_path chose for it (None: --no-fast)
    calibration: dict | None = None  # an fp8/int8 engine's calibration and accuracy gate (trtseg.accel.eight_bit)

    @abc.abstractmethod
    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        """(b, c, z, y, x) float32 on ``device`` -> (b, k, z, y, x) float32 on ``device``, a tensor the caller
        owns: no later call may reuse its memory (trtseg.infer adds mirrored predictions into it in place)."""

    def close(self) -> None:
        """Releases the backend's resources."""

    def warm_up(self, batch_shape: tuple[int, ...]) -> float:
        """Runs one batch of zeros of ``batch_shape`` (b, c, z, y, x): compiles, autotunes and allocates before the
        first real tile. Returns the seconds it took."""
        t0 = time.perf_counter()
        self.infer(torch.zeros(batch_shape, dtype=torch.float32, device=self.device))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> dict:
        return {"engine": self.name, "device": str(self.device)}

    def report(self) -> dict:
        """``describe()`` and, where the fast path chose the engine's options, what it chose and why, and an 8-bit
        engine's calibration: the run report's "engine"."""
        return {**self.describe(), **({"fast_path": self.fast_path} if self.fast_path else {}),
                **({"calibration": self.calibration} if self.calibration else {})}


def pad_batch(batch: torch.Tensor, size: int) -> torch.Tensor:
    """``batch`` (b, ...) with zero tiles appended up to ``size`` (unchanged when b >= size)."""
    n = batch.shape[0]
    return batch if n >= size else torch.cat([batch, batch.new_zeros((size - n, *batch.shape[1:]))])
