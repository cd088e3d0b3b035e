"""Engines: one narrow interface between the job and whatever runs the network.

An engine takes a batch of tiles (b, c, z, y, x) float32 on its device and returns logits (b, k, z, y, x) float32
on the same device. It owns whatever state it needs (network, execution context, stream) for its whole life.
Backends are imported lazily, so this module imports on any machine; asking for one whose library is missing
fails with a message that says what to install.
"""
from __future__ import annotations

import abc
import contextlib
from typing import Callable

import torch


class Engine(abc.ABC):
    """Runs a segmentation network on batches of tiles.

    name: backend name for reports ("torch", "onnxruntime", "tensorrt")
    device: where input and output tensors live
    max_batch: the largest batch the engine accepts (None: any)
    """

    name: str = "engine"
    device: torch.device = torch.device("cpu")
    max_batch: int | None = None

    @abc.abstractmethod
    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        """(b, c, z, y, x) float32 on ``device`` -> (b, k, z, y, x) float32 on ``device``."""

    def close(self) -> None:
        """Releases the backend's resources."""

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> dict:
        return {"engine": self.name, "device": str(self.device)}


class TorchEngine(Engine):
    """The network itself under PyTorch: CPU in float32, or CUDA with fp16/bf16 autocast and optional compile.

    network: an nn.Module in eval mode, deep supervision off
    device: "cpu" or "cuda[:N]"
    precision: "fp32", "fp16" or "bf16" (autocast; on CPU only fp32 is offered, as nnU-Net does)
    compile: wrap the network in torch.compile (CUDA; the first batches of each shape pay the compile time)
    """

    name = "torch"

    def __init__(self, network: torch.nn.Module, device: torch.device | str = "cpu", precision: str = "fp32",
                 compile: bool = False):
        self.device = torch.device(device)
        if precision not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"precision must be fp32, fp16 or bf16, got {precision!r}")
        if self.device.type == "cpu" and precision != "fp32":
            raise ValueError("the CPU engine runs fp32 only")
        self.precision = precision
        self.network = network.to(self.device).eval()
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed tile shapes: let cuDNN pick the fastest kernels, as nnU-Net does
        self._fn: Callable[[torch.Tensor], torch.Tensor] = self.network
        if compile:
            self._fn = torch.compile(self.network)  # type: ignore[assignment]
        self.compiled = compile

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    @torch.inference_mode()
    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            out = self._fn(batch)
        return out.float()

    def describe(self) -> dict:
        return {"engine": self.name, "device": str(self.device), "precision": self.precision, "compiled": self.compiled}
