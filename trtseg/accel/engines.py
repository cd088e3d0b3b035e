"""Engine selection and construction: ``create_engines(model, spec)`` gives one engine per fold.

Backends are imported lazily, inside the branch that needs them, so this module imports on any machine; asking
for one whose library is missing fails with a message that says what to install.
"""
from __future__ import annotations

import torch

from trtseg.accel.engine import Engine
from trtseg.options import ENGINE_KINDS as ENGINES  # declared once, with the --engine flag
from trtseg.options import EIGHT_BIT, EngineSpec


def default_cache() -> str:
    """Where exported ONNX graphs and built engines are kept: $TRTSEG_CACHE, else ~/.cache/trtseg."""
    import os

    return os.environ.get("TRTSEG_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "trtseg"))


def tensorrt_available() -> bool:
    from trtseg.accel import trt_api

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
    from trtseg.accel.onnx_export import export_onnx
    from trtseg import storage

    if model.onnx_urls:
        return model.onnx_urls[fold]
    url = storage.join(cache_url, "onnx", model.fingerprint, f"fold_{fold}.{precision}.b{batch or 'dyn'}.onnx")
    if not storage.exists(url):
        export_onnx(model.build_network(fold), url, model.num_input_channels, model.patch_size, batch=batch,
                    precision=precision)
    return url


def create_engines(model, spec: "EngineSpec", device: torch.device | str | None = None) -> list[Engine]:
    """One engine per fold of ``model``, as ``spec`` says (its kind resolved by ``resolve_engine_kind``).

    device: overrides ``spec.device`` (a Ray worker's own GPU); precision None means fp16 on CUDA (nnU-Net's
    autocast) and fp32 on the CPU. GPU-only options on a CPU device are refused, never dropped silently.
    ``spec.batch_size`` is the largest tile batch a TensorRT optimization profile covers; compiled PyTorch engines
    pad shorter batches to it (see ``TorchEngine``). With ``spec.fast`` (the default), trtseg.accel.fast_path
    first chooses the options for this model and device (checked once against fp32); every engine's ``fast_path``
    says what it chose.
    """
    from trtseg.accel import fast_path

    device = torch.device(device) if device is not None else spec.resolved_device()
    # 8-bit convolutions are the PyTorch engine's (trtseg.accel.eight_bit)
    kind = "torch" if spec.precision in EIGHT_BIT and spec.kind == "auto" else resolve_engine_kind(spec.kind, device)
    check_device_options(spec, device, kind)
    cache_url = spec.cache or default_cache()

    def build(s: EngineSpec, k: str, fold: str) -> Engine:
        return build_engine(model, fold, s, k, device, cache_url)

    choice = fast_path.choose(model, spec, device, kind, build, cache_url)
    engines = [choice.engine if (i == 0 and choice.engine is not None) else
               build(choice.spec, choice.kind or kind, fold) for i, fold in enumerate(model.folds)]
    for e in engines:
        e.fast_path = choice.to_json() if spec.fast else None
    return engines


def build_engine(model, fold: str, spec: "EngineSpec", kind: str, device: torch.device, cache_url: str) -> Engine:
    """The engine of one fold of ``model``: ``kind`` already resolved, ``spec`` taken as it is."""
    precision = spec.resolved_precision(device)
    batch = max(spec.batch_size, 1)
    if kind == "torch":
        def build(input_scales: dict | None = None) -> Engine:
            cache = package = None
            if spec.compile:
                from trtseg.accel.compile_cache import CompileCacheEntry, model_key_fields
                fields = model_key_fields(model, fold, spec, device, input_scales)
                cache = CompileCacheEntry(cache_url, fields)
                if spec.package:
                    from trtseg.accel.aoti_package import AotiPackageEntry
                    package = AotiPackageEntry(cache_url, fields)
            return torch_engine(model.build_network(fold), spec, device, compile_cache=cache, package=package,
                                input_scales=input_scales)

        if precision in EIGHT_BIT:  # calibrated and gated once (or refused, raising TrtsegError), then cached
            from trtseg.accel.eight_bit import calibrated_engine
            return calibrated_engine(model, fold, spec, device, cache_url, build)
        return build()
    if kind == "onnxruntime":
        from trtseg.accel.onnxruntime_engine import OnnxRuntimeEngine

        onnx_precision = "fp16" if precision == "fp16" else "fp32"
        return OnnxRuntimeEngine(onnx_for_fold(model, fold, cache_url, onnx_precision), device,
                                 model.labels.num_heads)
    from trtseg.accel.tensorrt_build import BuildSpec, EngineCache

    onnx_precision = "fp16" if precision in ("fp16", "bf16") else "fp32"
    onnx_url = onnx_for_fold(model, fold, cache_url, onnx_precision)
    build = BuildSpec(min_batch=1, opt_batch=batch, max_batch=batch)
    engine_bytes = EngineCache(cache_url).get_or_build(onnx_url, build, onnx_precision)
    if kind == "tensorrt":
        from trtseg.accel.tensorrt_runtime import TensorRTEngine

        return TensorRTEngine(engine_bytes, device, spec.cuda_graphs)
    from trtseg.accel.pycuda_runtime import PyCudaEngine

    return PyCudaEngine(engine_bytes)


def torch_engine(network: torch.nn.Module, spec: EngineSpec, device: torch.device | str | None = None,
                 **overrides) -> Engine:
    """A TorchEngine for ``network`` as ``spec`` says (the benchmarks build theirs here too); ``overrides`` replace
    TorchEngine's keyword arguments (e.g. static_batch)."""
    from trtseg.accel.torch_engine import TorchEngine

    device = torch.device(device) if device is not None else spec.resolved_device()
    # the 8-bit kernel takes fp16 tiles: on CUDA an 8-bit engine's network is fp16 (normalizations fp32) around it
    fp16_weights = spec.fp16_weights or (spec.resolved_precision(device) in EIGHT_BIT and device.type == "cuda")
    kwargs = dict(compile=spec.compile or False, cuda_graphs=spec.cuda_graphs, channels_last=spec.channels_last,
                  fp16_weights=fp16_weights, static_batch=max(spec.batch_size, 1),
                  fold_convolutions="fold-convolutions" in spec.rewrites,
                  merge_upsampling="merge-upsampling" in spec.rewrites, fuse_norms="fuse-norms" in spec.rewrites)
    return TorchEngine(network, device, spec.resolved_precision(device), **{**kwargs, **overrides})


def check_device_options(spec: "EngineSpec", device: torch.device, kind: str) -> None:
    """Refuses, naming the flags, options that cannot run where the engine runs: CUDA-only options on a CPU device
    and PyTorch-only options on another engine. The same rule on every path (single process, every Ray actor), so
    no option is ever dropped silently. (--compile, --channels-last, --fold-convolutions and --merge-upsampling
    run on the CPU too; they pay on CUDA.)"""
    torch_only = [f for f, on in (("--compile", spec.compile), ("--channels-last", spec.channels_last),
                                  ("--fp16-weights", spec.fp16_weights)) if on]
    torch_only += [f"--{r}" for r in sorted(spec.rewrites)]
    if spec.precision in EIGHT_BIT:
        torch_only.append(f"--precision {spec.precision}")
    if kind != "torch" and torch_only:
        raise ValueError(f"{' '.join(torch_only)}: options of the PyTorch engine (--engine torch), not of {kind}")
    if spec.precision in EIGHT_BIT and (spec.rewrites & {"fold-convolutions", "merge-upsampling", "fuse-norms"}):
        raise ValueError(f"--precision {spec.precision} with --{' --'.join(sorted(spec.rewrites))}: the 8-bit "
                         "convolutions replace the layers these rewrite")
    if device.type == "cpu":
        cuda_only = [f for f, on in (("--cuda-graphs", spec.cuda_graphs), ("--fp16-weights", spec.fp16_weights),
                                     ("--fuse-norms", "fuse-norms" in spec.rewrites)) if on]
        if kind == "torch" and spec.precision not in (None, "fp32", *EIGHT_BIT):  # 8 bits: quant8's reference
            cuda_only.append(f"--precision {spec.precision}")
        if cuda_only:
            raise ValueError(f"{' '.join(cuda_only)}: CUDA only, and the engine's device is the CPU")
