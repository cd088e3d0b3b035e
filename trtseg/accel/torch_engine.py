"""The PyTorch backend: the network itself, CPU fp32 or CUDA with fp16/bf16, compile, CUDA graphs and the network
rewrites (``trtseg.accel.rewrites``, each imported only when asked for)."""
from __future__ import annotations

import contextlib
import os
from typing import Callable

import torch

from trtseg.accel.engine import Engine, pad_batch
from trtseg.options import EIGHT_BIT


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
    fp16_weights: with fp16, cast the network itself to fp16 instead of autocasting, keeping every normalization
        layer in fp32 (its input is cast up and its output back), as the FP16 ONNX export does
    fold_convolutions: compute the 3x3x3 convolutions with 32 input and output channels width-folded
        (``trtseg.accel.rewrites.conv_fold``): the same function on wider tensor-core tiles; it pays with channels_last on CUDA
    merge_upsampling: merge each decoder stage's transposed convolution into the convolution after it
        (``trtseg.accel.rewrites.upsample_merge``, nnU-Net v2 networks): the same function with fewer multiply-adds and no
        concatenation
    fuse_norms: fuse InstanceNorm + LeakyReLU into the full-resolution 32-channel convolutions, the first block and
        the segmentation head with Triton kernels (``trtseg.accel.rewrites.norm_fusion``; CUDA with fp16_weights and channels_last):
        the same function with fewer passes over the largest tensors
    static_batch: with compile or CUDA graphs, pad a shorter batch with zero tiles to this size, so that one
        compiled graph serves every batch; without it, each new short batch size (a volume's last batch) compiles
        or captures another graph, some 15 s each under torch.compile
    input_scales: with precision fp8 or int8, each quantizable layer's calibrated input scale
        (trtseg.accel.eight_bit): those convolutions run as ``rewrites.conv8.Conv8`` (the 8-bit kernel on CUDA, which
        takes fp16_weights' fp16 tiles; quant8's float32 reference on the CPU), the rest of the network in fp16 on
        CUDA and fp32 on the CPU
    """

    name = "torch"

    def __init__(self, network: torch.nn.Module, device: torch.device | str = "cpu", precision: str = "fp32",
                 compile: bool | str = False, cuda_graphs: bool = False, channels_last: bool = False,
                 fp16_weights: bool = False, static_batch: int | None = None, fold_convolutions: bool = False,
                 merge_upsampling: bool = False, fuse_norms: bool = False, compile_cache=None, package=None,
                 input_scales: dict[str, float] | None = None):
        self.device = torch.device(device)
        if precision not in ("fp32", "fp16", "bf16", *EIGHT_BIT):
            raise ValueError(f"precision must be fp32, fp16, bf16, fp8 or int8, got {precision!r}")
        if self.device.type == "cpu" and precision not in ("fp32", *EIGHT_BIT):
            raise ValueError("the CPU engine runs fp32 (or the 8-bit reference) only")
        if (precision in EIGHT_BIT) != (input_scales is not None):
            raise ValueError("precision fp8 and int8, and only they, take input_scales (trtseg.accel.eight_bit)")
        if precision in EIGHT_BIT and (fold_convolutions or merge_upsampling or fuse_norms):
            raise ValueError("the 8-bit convolutions replace the layers that fold-convolutions, merge-upsampling and "
                             "fuse-norms rewrite: they are not combined")
        if precision in EIGHT_BIT and self.device.type == "cuda" and not fp16_weights:
            raise ValueError("8-bit convolutions on CUDA take fp16 tiles: they need fp16_weights")
        self.precision = precision
        if fp16_weights and precision not in ("fp16", *EIGHT_BIT):
            raise ValueError("fp16_weights needs precision fp16 (or fp8/int8)")
        self.fp16_weights = fp16_weights
        self.channels_last = channels_last
        network = network.to(self.device).eval()
        # 8-bit layers first, from the float32 weights: Conv8 keeps its 8-bit weights out of the later conversions
        self.quantized_convolutions = 0
        if input_scales is not None:
            from trtseg.accel.rewrites.conv8 import quantize_convolutions
            self.quantized_convolutions = len(quantize_convolutions(network, input_scales, precision))
        # merged before folding, so that the skip halves of merged stages (32->32 at full resolution) fold too
        self.merged_upsamplings = self.folded_convolutions = 0
        if merge_upsampling:
            from trtseg.accel.rewrites.upsample_merge import merge_upsampling as merge
            self.merged_upsamplings = merge(network)
        if fold_convolutions:
            from trtseg.accel.rewrites.conv_fold import fold_narrow_convolutions
            self.folded_convolutions = fold_narrow_convolutions(network)
        if fp16_weights:
            network = _fp16_with_fp32_norms(network)
        if channels_last:
            network = network.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
        if fuse_norms and not (self.device.type == "cuda" and fp16_weights and channels_last):
            raise ValueError("fuse_norms needs a CUDA device, fp16_weights and channels_last: its kernels take fp16 "
                             "channels-last tensors")
        # last: the fused kernels read the fp16 weights the unfused network would use. Before a package loads:
        # importing the rewrite registers the custom ops (trtseg::...) that a package of the fused network calls
        self.fused_norms = 0
        if fuse_norms:
            from trtseg.accel.rewrites.norm_fusion import fuse_norms as fuse
            self.fused_norms = fuse(network)
        self.compile_mode = (compile if isinstance(compile, str) else "default") if compile else None
        # compiled code, with a package entry (--compiled-package, experimental): the AOTInductor package of an
        # earlier process on this GPU type (trtseg/accel/aoti_package.py), loaded without TorchDynamo; without one,
        # the first batch builds it (``_compile``), and torch.compile runs the network where it cannot be packaged
        self.package = package if compile else None
        self.compile_cache = compile_cache if compile else None
        runner = self.package.load(self.device) if self.package is not None else None
        self.network = network
        if self.device.type == "cuda":
            # fixed tile shapes: let cuDNN pick the fastest kernels, as nnU-Net does. Its timings are kept per thread
            # and per process, so each process pays them again at warm-up; TRTSEG_CUDNN_BENCHMARK=0 leaves the choice
            # to cuDNN's heuristics, to time the two against each other on one machine
            # (python -m benchmarks.startup_profile --env TRTSEG_CUDNN_BENCHMARK=0)
            torch.backends.cudnn.benchmark = os.environ.get("TRTSEG_CUDNN_BENCHMARK", "1") != "0"
        self._fn: Callable[[torch.Tensor], torch.Tensor] = runner if runner is not None else self.network
        self._package_shape = _package_shape(self.package) if runner is not None else None
        # with a package entry but no package, the first batch builds it (``_compile``); without an entry,
        # torch.compile's wrapper is set up now
        self._compile_pending = self.package is not None and runner is None
        if compile and self.package is None:
            self._torch_compile()
        self.compiled = bool(compile)
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[tuple, tuple] = {}  # batch shape -> (graph, static input, static output)
        self.static_batch = static_batch if (compile or cuda_graphs) else None
        self.max_batch = self.static_batch

    def _torch_compile(self) -> None:
        """torch.compile's wrapper as ``_fn``, after loading the compile cache (trtseg/accel/compile_cache.py: the
        compiled graphs of an earlier process on this GPU type, loaded before torch.compile is called; a loaded
        entry sets Inductor's compile threads to one before the wrapper would start its pool of compile workers;
        saved after warm_up when there were none)."""
        self._compile_pending = False
        if self.compile_cache is not None:
            self.compile_cache.load()
        # static shapes: one graph per batch size (with static_batch, short batches are padded to the full one).
        # Left to detect dynamic shapes, torch.compile would recompile on a short batch with a symbolic batch
        # dimension, and that slower graph then serves the full batches too
        mode = _TORCH_COMPILE_MODES.get(self.compile_mode, self.compile_mode)  # type: ignore[arg-type]
        self._fn = torch.compile(self.network, mode=mode, dynamic=False)  # type: ignore[assignment]

    def _compile(self, batch: torch.Tensor) -> None:
        """The first batch of a compiled engine without a package: builds the package for ``batch``'s shape, dtype
        and memory order, or falls back to torch.compile where the network cannot be packaged."""
        self._compile_pending = False
        package = self.package
        runner = None
        if package is not None and not (package.status or "").startswith("unusable"):
            runner = package.build(self.network, batch, self.device, max_autotune=self.compile_mode == "max-autotune")
        if runner is not None:
            self._fn, self._package_shape = runner, _package_shape(package)
        else:
            self._torch_compile()

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
        if self.fp16_weights:
            batch = batch.half()
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last_3d)
        return batch

    def _autocast(self):
        if self.precision in ("fp32", *EIGHT_BIT) or self.fp16_weights:
            return contextlib.nullcontext()
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    @torch.inference_mode()
    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        n = batch.shape[0]
        if self.static_batch:  # after an out-of-memory halving (trtseg.infer.run_engine), the smaller size is static
            batch = pad_batch(batch, min(self.static_batch, self.oom_batch_limit or self.static_batch))
        batch = self._prepare(batch)
        if self._compile_pending:
            self._compile(batch)
        if self._package_shape is not None and tuple(batch.shape) != self._package_shape:
            # another batch size than the package's (after an out-of-memory halving): the network itself runs it
            with self._autocast():
                return self.network(batch)[:n].float().contiguous()
        if self.cuda_graphs:
            return self._replay(batch)[:n].float().contiguous()
        with self._autocast():
            out = self._fn(batch)
        return out[:n].float().contiguous()

    def warm_up(self, batch_shape: tuple[int, ...]) -> float:
        """Engine.warm_up (compiles), then saves the compile results where the cache had none to load."""
        seconds = super().warm_up(batch_shape)
        cache = self.compile_cache
        if cache is not None and cache.status not in (None, "loaded"):  # None: the package ran, not torch.compile
            try:
                cache.save()
            except Exception as e:  # a cache that cannot be written costs the next process a compile, not this run
                cache.status = f"not saved ({type(e).__name__}: {e})"
        return seconds

    def describe(self) -> dict:
        return {"engine": self.name, "device": str(self.device), "precision": self.precision, "compiled": self.compiled,
                "compile_mode": self.compile_mode,
                "compile_cache": self.compile_cache.describe() if self.compile_cache is not None else None,
                "package": self.package.describe() if self.package is not None else None,
                "cuda_graphs": self.cuda_graphs, "channels_last": self.channels_last, "fp16_weights": self.fp16_weights,
                "folded_convolutions": self.folded_convolutions, "merged_upsamplings": self.merged_upsamplings,
                "fused_norms": self.fused_norms, "quantized_convolutions": self.quantized_convolutions}


def _package_shape(package) -> tuple[int, ...] | None:
    """The input shape (b, c, z, y, x) a loaded or built package takes."""
    shape = ((package.meta or {}).get("check") or {}).get("batch")
    return tuple(shape) if shape else None


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
