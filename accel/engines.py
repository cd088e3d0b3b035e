"""Engines: one narrow interface between the job and whatever runs the network.

An engine takes a batch of tiles (b, c, z, y, x) float32 on its device and returns logits (b, k, z, y, x) float32
on the same device. It owns whatever state it needs (network, execution context, stream) for its whole life.
Backends are imported lazily, so this module imports on any machine; asking for one whose library is missing
fails with a message that says what to install.
"""
from __future__ import annotations

import abc
import contextlib
import time
from typing import Callable

import torch

from accel.conv_fold import fold_narrow_convolutions
from accel import norm_fusion, upsample_merge


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


def pad_batch(batch: torch.Tensor, size: int) -> torch.Tensor:
    """``batch`` (b, ...) with zero tiles appended up to ``size`` (unchanged when b >= size)."""
    n = batch.shape[0]
    return batch if n >= size else torch.cat([batch, batch.new_zeros((size - n, *batch.shape[1:]))])


# --compile's names -> torch.compile's modes
_TORCH_COMPILE_MODES: dict[str, str | None] = {"default": None, "max-autotune": "max-autotune-no-cudagraphs"}


class TorchEngine(Engine):
    """The network itself under PyTorch: CPU in float32, or CUDA with fp16/bf16 autocast and optional compile.

    network: an nn.Module in eval mode, deep supervision off
    device: "cpu" or "cuda[:N]"
    precision: "fp32", "fp16" or "bf16" (autocast; on CPU only fp32 is offered, as nnU-Net does)
    compile: wrap the network in torch.compile (CUDA; the first batches of each shape pay the compile time); a
        string is torch.compile's mode; "max-autotune" means "max-autotune-no-cudagraphs" (CUDA graph trees are
        bound to one thread, and a job's actor warms up in another thread than the one that runs its tiles)
    cuda_graphs: capture one CUDA graph per batch shape and replay it (CUDA; static input/output buffers)
    channels_last: keep weights and tiles in channels-last-3d memory order (b, z, y, x, c), which cuDNN's fp16
        tensor-core convolutions prefer; values are unchanged
    half_weights: with fp16, cast the network itself to fp16 instead of autocasting, keeping every normalization
        layer in fp32 (its input is cast up and its output back), as the FP16 ONNX export does
    fold_convolutions: compute the 3x3x3 convolutions with 32 input and output channels width-folded
        (``accel.conv_fold``): the same function on wider tensor-core tiles; it pays with channels_last on CUDA
    merge_upsampling: merge each decoder stage's transposed convolution into the convolution after it
        (``accel.upsample_merge``, nnU-Net v2 networks): the same function with fewer multiply-adds and no
        concatenation
    fuse_norms: fuse InstanceNorm + LeakyReLU into the full-resolution 32-channel convolutions, the first block and
        the segmentation head with Triton kernels (``accel.norm_fusion``; CUDA with half_weights and channels_last):
        the same function with fewer passes over the largest tensors
    static_batch: with compile or CUDA graphs, pad a shorter batch with zero tiles to this size, so that one
        compiled graph serves every batch; without it, each new short batch size (a volume's last batch) compiles
        or captures another graph, some 15 s each under torch.compile
    """

    name = "torch"

    def __init__(self, network: torch.nn.Module, device: torch.device | str = "cpu", precision: str = "fp32",
                 compile: bool | str = False, cuda_graphs: bool = False, channels_last: bool = False,
                 half_weights: bool = False, static_batch: int | None = None, fold_convolutions: bool = False,
                 merge_upsampling: bool = False, fuse_norms: bool = False):
        self.device = torch.device(device)
        if precision not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"precision must be fp32, fp16 or bf16, got {precision!r}")
        if self.device.type == "cpu" and precision != "fp32":
            raise ValueError("the CPU engine runs fp32 only")
        self.precision = precision
        if half_weights and precision != "fp16":
            raise ValueError("half_weights needs precision fp16")
        self.half_weights = half_weights
        self.channels_last = channels_last
        network = network.to(self.device).eval()
        # merged before folding, so that the skip halves of merged stages (32->32 at full resolution) fold too
        self.merged_upsamplings = upsample_merge.merge_upsampling(network) if merge_upsampling else 0
        self.folded_convolutions = fold_narrow_convolutions(network) if fold_convolutions else 0
        if half_weights:
            network = _fp16_with_fp32_norms(network)
        if channels_last:
            network = network.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
        if fuse_norms and not (self.device.type == "cuda" and half_weights and channels_last):
            raise ValueError("fuse_norms needs a CUDA device, half_weights and channels_last: its kernels take fp16 "
                             "channels-last tensors")
        # last: the fused kernels read the fp16 weights the unfused network would use
        self.fused_norms = norm_fusion.fuse_norms(network) if fuse_norms else 0
        self.network = network
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed tile shapes: let cuDNN pick the fastest kernels, as nnU-Net does
        self._fn: Callable[[torch.Tensor], torch.Tensor] = self.network
        self.compile_mode = (compile if isinstance(compile, str) else "default") if compile else None
        if compile:
            # static shapes: one graph per batch size (with static_batch, short batches are padded to the full one).
            # Left to detect dynamic shapes, torch.compile would recompile on a short batch with a symbolic batch
            # dimension, and that slower graph then serves the full batches too
            mode = _TORCH_COMPILE_MODES.get(self.compile_mode, self.compile_mode)  # type: ignore[arg-type]
            self._fn = torch.compile(self.network, mode=mode, dynamic=False)  # type: ignore[assignment]
        self.compiled = bool(compile)
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[tuple, tuple] = {}  # batch shape -> (graph, static input, static output)
        self.static_batch = static_batch if (compile or cuda_graphs) else None
        self.max_batch = self.static_batch

    def _replay(self, batch: torch.Tensor) -> torch.Tensor:
        key = tuple(batch.shape)
        if key not in self._graphs:
            static_in = batch.clone()
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side), self._autocast():
                for _ in range(2):  # warm-up outside the graph (cuDNN autotuning, lazy init)
                    self._fn(static_in)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), self._autocast():
                static_out = self._fn(static_in)
            self._graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self._graphs[key]
        static_in.copy_(batch)
        graph.replay()
        return static_out.clone()

    def _prepare(self, batch: torch.Tensor) -> torch.Tensor:
        if self.half_weights:
            batch = batch.half()
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last_3d)
        return batch

    def _autocast(self):
        if self.precision == "fp32" or self.half_weights:
            return contextlib.nullcontext()
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    @torch.inference_mode()
    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        n = batch.shape[0]
        if self.static_batch:  # after an out-of-memory halving (trtseg.infer.run_engine), the smaller size is static
            batch = pad_batch(batch, min(self.static_batch, getattr(self, "oom_batch_limit", None) or self.static_batch))
        batch = self._prepare(batch)
        if self.cuda_graphs:
            return self._replay(batch)[:n].float().contiguous()
        with self._autocast():
            out = self._fn(batch)
        return out[:n].float().contiguous()

    def describe(self) -> dict:
        return {"engine": self.name, "device": str(self.device), "precision": self.precision, "compiled": self.compiled,
                "compile_mode": self.compile_mode,
                "cuda_graphs": self.cuda_graphs, "channels_last": self.channels_last, "half_weights": self.half_weights,
                "folded_convolutions": self.folded_convolutions, "merged_upsamplings": self.merged_upsamplings,
                "fused_norms": self.fused_norms}


class _Fp32Norm(torch.nn.Module):
    """Runs a normalization layer in fp32 inside an fp16 network: InstanceNorm's variance loses accuracy in fp16."""

    def __init__(self, norm: torch.nn.Module):
        super().__init__()
        self.norm = norm.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.float()).to(x.dtype)


_NORMS = (torch.nn.modules.instancenorm._InstanceNorm, torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm,
          torch.nn.LayerNorm)


def _fp16_with_fp32_norms(network: torch.nn.Module) -> torch.nn.Module:
    network = network.half()
    for parent in list(network.modules()):
        for name, child in parent.named_children():
            if isinstance(child, _NORMS):
                setattr(parent, name, _Fp32Norm(child))
    return network


class OnnxRuntimeEngine(Engine):
    """An ONNX graph under ONNX Runtime: the CPU default; the CUDA provider when present (I/O bound to torch CUDA
    tensors, no host copies).

    onnx_url: the graph (any fsspec URL); a fixed batch dimension makes ``max_batch`` that size
    device: "cpu", or "cuda[:N]" (needs onnxruntime-gpu)
    """

    name = "onnxruntime"

    def __init__(self, onnx_url: str, device: torch.device | str = "cpu", num_classes: int | None = None):
        import onnxruntime as ort

        from accel.onnx_export import INPUT, OUTPUT, onnx_session

        self.device = torch.device(device)
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeError("onnxruntime has no CUDAExecutionProvider here: install onnxruntime-gpu, or use --engine torch")
            providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        self.session = onnx_session(onnx_url, providers)  # type: ignore[arg-type]
        self.url = onnx_url
        self.input_name, self.output_name = INPUT, OUTPUT
        b = self.session.get_inputs()[0].shape[0]
        self.max_batch = b if isinstance(b, int) else None
        out_c = self.session.get_outputs()[0].shape[1]
        self.num_classes = out_c if isinstance(out_c, int) else num_classes

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        n = batch.shape[0]
        if self.max_batch is not None:  # a fixed-batch graph: pad the last, short batch
            batch = pad_batch(batch, self.max_batch)
        if self.device.type == "cuda":
            out = self._infer_cuda(batch.contiguous())
        else:
            out = torch.from_numpy(self.session.run([self.output_name], {self.input_name: batch.cpu().numpy()})[0])
        return out[:n]

    def _infer_cuda(self, batch: torch.Tensor) -> torch.Tensor:
        import numpy as np

        assert self.num_classes is not None, "the graph's class count must be known to bind its output"
        out = torch.empty((batch.shape[0], self.num_classes, *batch.shape[2:]), dtype=torch.float32, device=batch.device)
        binding = self.session.io_binding()
        idx = batch.device.index or 0
        binding.bind_input(self.input_name, "cuda", idx, np.float32, tuple(batch.shape), batch.data_ptr())
        binding.bind_output(self.output_name, "cuda", idx, np.float32, tuple(out.shape), out.data_ptr())
        torch.cuda.current_stream(batch.device).synchronize()  # ORT runs on its own stream
        self.session.run_with_iobinding(binding)
        return out

    def describe(self) -> dict:
        return {"engine": self.name, "device": str(self.device), "onnx": self.url,
                "providers": self.session.get_providers()}


ENGINES = ("auto", "tensorrt", "torch", "onnxruntime", "pycuda")


def default_cache() -> str:
    """Where exported ONNX graphs and built engines are kept: $TRTSEG_CACHE, else ~/.cache/trtseg."""
    import os

    return os.environ.get("TRTSEG_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "trtseg"))


def tensorrt_available() -> bool:
    from accel import trt_api

    return trt_api.available() and torch.cuda.is_available()


def resolve_engine_kind(kind: str, device: torch.device) -> str:
    """``auto``: TensorRT if it imports and a GPU exists, then PyTorch CUDA, then ONNX Runtime on the CPU."""
    if kind not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {kind!r}")
    if kind != "auto":
        return kind
    if device.type == "cuda":
        return "tensorrt" if tensorrt_available() else "torch"
    return "onnxruntime"


def onnx_for_fold(model, fold: str, cache_url: str, precision: str = "fp32", batch: int | None = None) -> str:
    """The ONNX graph of one fold: the model's own (ONNX + card), else exported once into the cache."""
    from accel.onnx_export import export_onnx
    from trtseg import storage

    if model.onnx_urls:
        return model.onnx_urls[fold]
    url = storage.join(cache_url, "onnx", model.fingerprint, f"fold_{fold}.{precision}.b{batch or 'dyn'}.onnx")
    if not storage.exists(url):
        export_onnx(model.build_network(fold), url, model.num_input_channels, model.patch_size, batch=batch,
                    precision=precision)
    return url


def create_engines(model, kind: str = "auto", device: torch.device | str = "cpu", precision: str | None = None,
                   compile: bool | str = False, cache_url: str | None = None, max_batch: int = 4,
                   cuda_graphs: bool = False, channels_last: bool = False, half_weights: bool = False,
                   fold_convolutions: bool = False, merge_upsampling: bool = False,
                   fuse_norms: bool = False) -> list[Engine]:
    """One engine per fold of ``model``, of ``kind`` (see ``resolve_engine_kind``), on ``device``.

    precision: fp32, fp16 or bf16; None means fp16 on CUDA (nnU-Net's autocast) and fp32 on the CPU
    cache_url: where ONNX graphs and TensorRT engines are kept (default: ``default_cache()``)
    max_batch: the largest tile batch a TensorRT optimization profile covers; compiled PyTorch engines pad shorter
        batches to it (see ``TorchEngine``)
    channels_last, half_weights, fold_convolutions, merge_upsampling, fuse_norms: PyTorch engine options (see
        ``TorchEngine``)
    """
    device = torch.device(device)
    kind = resolve_engine_kind(kind, device)
    precision = precision or ("fp16" if device.type == "cuda" else "fp32")
    cache_url = cache_url or default_cache()
    engines: list[Engine] = []
    for fold in model.folds:
        if kind == "torch":
            engines.append(TorchEngine(model.build_network(fold), device, precision, compile, cuda_graphs,
                                       channels_last, half_weights, static_batch=max_batch,
                                       fold_convolutions=fold_convolutions, merge_upsampling=merge_upsampling,
                                       fuse_norms=fuse_norms))
        elif kind == "onnxruntime":
            onnx_precision = "fp16" if precision == "fp16" else "fp32"
            engines.append(OnnxRuntimeEngine(onnx_for_fold(model, fold, cache_url, onnx_precision), device,
                                             model.labels.num_heads))
        elif kind in ("tensorrt", "pycuda"):
            from accel.tensorrt_build import BuildSpec, EngineCache

            onnx_precision = "fp16" if precision in ("fp16", "bf16") else "fp32"
            onnx_url = onnx_for_fold(model, fold, cache_url, onnx_precision)
            spec = BuildSpec(min_batch=1, opt_batch=max_batch, max_batch=max_batch)
            engine_bytes = EngineCache(cache_url).get_or_build(onnx_url, spec, onnx_precision)
            if kind == "tensorrt":
                from accel.tensorrt_runtime import TensorRTEngine

                engines.append(TensorRTEngine(engine_bytes, device, cuda_graphs))
            else:
                from accel.pycuda_runtime import PyCudaEngine

                engines.append(PyCudaEngine(engine_bytes))
    return engines
