"""ONNX -> TensorRT engine, and the engine cache that lets a cluster build once per GPU type.

Written to the TensorRT 10.x / 11.x Python API:
- strongly typed networks (precision comes from the ONNX graph: FP32, FP16 casts, or INT8 Q/DQ), so the FP16 and
  INT8 builder flags and calibrators that TensorRT 11 removed are never used;
- one optimization profile over the batch dimension (min/opt/max) when the graph's batch is dynamic;
- a persistent timing cache and the builder optimization level;
- the plugin library initialised before parsing.
The same code drives TensorRT-RTX (``tensorrt_rtx``), which can also build ahead of time for a compute capability
without a GPU (``BuildSpec.target_cc``): that is how CI proves our ONNX builds.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from trtseg.accel.trt_api import is_rtx, module_name, shape_of, trt, version
from trtseg import storage
from trtseg.errors import TrtsegError


@dataclass(frozen=True)
class BuildSpec:
    """How an engine is built.

    min_batch/opt_batch/max_batch: the optimization profile over the batch (used when the batch is dynamic)
    optimization_level: TensorRT's builder optimization level (0 fastest build .. 5 most search)
    workspace_gib: workspace memory pool limit; None leaves TensorRT's default
    target_cc: TensorRT-RTX only: build ahead of time for this compute capability (e.g. "SM89") without a GPU
    """

    min_batch: int = 1
    opt_batch: int = 4
    max_batch: int = 4
    optimization_level: int = 3
    workspace_gib: float | None = None
    target_cc: str | None = None


@dataclass(frozen=True)
class Target:
    """What an engine is bound to: the TensorRT build that made it and the GPU it runs on."""

    module: str
    trt_version: str
    gpu_name: str
    compute_capability: str

    @property
    def slug(self) -> str:
        gpu = "".join(c if c.isalnum() else "-" for c in self.gpu_name).strip("-")
        return f"{self.module}-{self.trt_version}/{gpu}-{self.compute_capability}"


def current_target(spec: BuildSpec) -> Target:
    """The local machine's target: its first CUDA GPU, or, for an ahead-of-time TensorRT-RTX build, ``spec.target_cc``."""
    if spec.target_cc:
        if not is_rtx():
            raise TrtsegError("target_cc (ahead-of-time builds without a GPU) needs TensorRT-RTX")
        return Target(module_name(), version(), f"any-{spec.target_cc}", spec.target_cc.lower())
    if not torch.cuda.is_available():
        raise TrtsegError("no CUDA GPU: TensorRT engines are built on the GPU type they will run on "
                          "(or ahead of time with TensorRT-RTX and --target-cc)")
    major, minor = torch.cuda.get_device_capability()
    return Target(module_name(), version(), torch.cuda.get_device_name(), f"sm{major}{minor}")


def _logger() -> Any:
    return trt.Logger(trt.Logger.WARNING)


def build_engine(onnx_path: str, spec: BuildSpec, timing_cache: bytes | None = None) -> tuple[bytes, bytes | None, dict]:
    """Builds a serialized engine from a local ONNX file.

    Returns (engine bytes, updated timing cache bytes or None, a description of the network's inputs/outputs).
    """
    logger = _logger()
    if hasattr(trt, "init_libnvinfer_plugins"):
        trt.init_libnvinfer_plugins(logger, "")
    builder = trt.Builder(logger)
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    flags = 1 << int(strongly_typed) if strongly_typed is not None else 0  # TensorRT 11: every network is strongly typed
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise TrtsegError(f"{onnx_path}: TensorRT cannot parse this ONNX ({errors or 'no detail'})")
    config = builder.create_builder_config()
    config.builder_optimization_level = spec.optimization_level
    if spec.workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(spec.workspace_gib * 2 ** 30))
    if spec.target_cc:  # TensorRT-RTX ahead-of-time build: no GPU needed
        rtx_config: Any = config
        rtx_config.num_compute_capabilities = 1
        rtx_config.set_compute_capability(getattr(trt, "ComputeCapability").__members__[spec.target_cc.upper()], 0)
    cache = config.create_timing_cache(timing_cache or b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    io: dict[str, list[dict]] = {"inputs": [], "outputs": []}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        shape = shape_of(t.shape)
        io["inputs"].append({"name": t.name, "shape": list(shape), "dtype": str(t.dtype)})
        if shape[0] == -1:
            if any(d == -1 for d in shape[1:]):
                raise TrtsegError(f"{onnx_path}: dynamic spatial dimensions need explicit profile shapes; "
                                  "export with a fixed patch size for TensorRT")
            rest = list(shape[1:])
            profile = builder.create_optimization_profile()
            profile.set_shape(t.name, trt.Dims([spec.min_batch, *rest]), trt.Dims([spec.opt_batch, *rest]),
                              trt.Dims([spec.max_batch, *rest]))
            config.add_optimization_profile(profile)
    for i in range(network.num_outputs):
        t = network.get_output(i)
        io["outputs"].append({"name": t.name, "shape": list(shape_of(t.shape)), "dtype": str(t.dtype)})
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TrtsegError(f"{onnx_path}: TensorRT failed to build an engine (see the TensorRT log above)")
    new_cache = config.get_timing_cache()
    cache_bytes = bytes(memoryview(new_cache.serialize())) if new_cache is not None else None
    return bytes(memoryview(serialized)), cache_bytes, io


class EngineCache:
    """Engines on any fsspec URL, keyed by ONNX hash, TensorRT version, GPU name and compute capability,
    optimization profile and precision: a cluster builds once per GPU type and every node reuses it.

    Layout: ``CACHE/engines/<module>-<version>/<gpu>-<cc>/<key>.engine`` with ``<key>.json`` (what it was built
    from and for), and ``CACHE/timing/<module>-<version>/<gpu>-<cc>.cache``.
    Rebuild rules: a different ONNX, TensorRT version, GPU, profile, precision or optimization level is a different
    key, so a new engine; ``rebuild=True`` replaces an existing one.
    """

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.builds = 0  # engines this object built (the rest came from the cache)

    @staticmethod
    def key(onnx_sha256: str, spec: BuildSpec, precision: str, target: Target) -> str:
        blob = json.dumps({"onnx": onnx_sha256, "spec": asdict(spec), "precision": precision, "target": asdict(target)},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def paths(self, key: str, target: Target) -> tuple[str, str]:
        base = storage.join(self.url, "engines", target.slug, key)
        return base + ".engine", base + ".json"

    def get_or_build(self, onnx_url: str, spec: BuildSpec, precision: str, rebuild: bool = False,
                     model_fingerprint: str | None = None) -> bytes:
        from trtseg.accel.onnx_export import local_copy

        try:
            onnx_raw = storage.read_bytes(onnx_url)
        except FileNotFoundError:
            raise TrtsegError(f"{onnx_url}: ONNX file not found") from None
        sha = hashlib.sha256(onnx_raw).hexdigest()
        target = current_target(spec)
        key = self.key(sha, spec, precision, target)
        engine_url, meta_url = self.paths(key, target)
        if not rebuild and storage.exists(engine_url) and storage.exists(meta_url):
            meta = json.loads(storage.read_bytes(meta_url))
            check_target(meta, target, engine_url)
            return storage.read_bytes(engine_url)
        timing_url = storage.join(self.url, "timing", target.slug + ".cache")
        timing = storage.read_bytes(timing_url) if storage.exists(timing_url) else None
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            engine, new_timing, io = build_engine(local_copy(onnx_url, tmp), spec, timing)
        self.builds += 1
        meta = {"target": asdict(target), "onnx_url": onnx_url, "onnx_sha256": sha, "precision": precision,
                "spec": asdict(spec), "io": io, "build_seconds": round(time.perf_counter() - t0, 2),
                "model_fingerprint": model_fingerprint, "key": key}
        storage.write_bytes_atomic(engine_url, engine)
        storage.write_bytes_atomic(meta_url, json.dumps(meta, indent=2).encode())
        if new_timing:
            storage.write_bytes_atomic(timing_url, new_timing)
        return engine


def check_target(meta: dict, target: Target, engine_url: str) -> None:
    """Refuses an engine built with another TensorRT or for another GPU, with a message that says so."""
    built = meta.get("target", {})
    if (built.get("module"), built.get("trt_version")) != (target.module, target.trt_version):
        raise TrtsegError(f"{engine_url}: built with {built.get('module')} {built.get('trt_version')}, the local machine has "
                          f"{target.module} {target.trt_version}; rebuild it with `trtseg build`")
    if built.get("compute_capability") != target.compute_capability or built.get("gpu_name") != target.gpu_name:
        raise TrtsegError(f"{engine_url}: built for {built.get('gpu_name')} ({built.get('compute_capability')}), "
                          f"this GPU is {target.gpu_name} ({target.compute_capability}); rebuild it with `trtseg build`")


def check_engine_fits(meta: dict, model, engine_url: str) -> None:
    """Refuses an engine built for another model: its input channels, output classes or patch differ."""
    try:
        inp, out = meta["io"]["inputs"][0]["shape"], meta["io"]["outputs"][0]["shape"]
    except (KeyError, IndexError):
        raise TrtsegError(f"{engine_url}: its metadata does not describe the engine's inputs and outputs") from None
    want_in = [model.num_input_channels, *model.patch_size]
    if list(inp[1:]) != want_in or out[1] != model.labels.num_heads:
        raise TrtsegError(f"{engine_url}: built for another model (input {inp}, output {out}); this model takes "
                          f"{want_in} (channels, z, y, x) and gives {model.labels.num_heads} classes")
    if meta.get("model_fingerprint") and meta["model_fingerprint"] != model.fingerprint:
        raise TrtsegError(f"{engine_url}: built from model {meta['model_fingerprint']}, not {model.fingerprint}")


def engine_file_meta(engine_url: str) -> dict:
    """The metadata beside an engine file (``X.engine`` -> ``X.json``), with clear errors when absent or broken."""
    meta_url = engine_url[: -len(".engine")] + ".json" if engine_url.endswith(".engine") else engine_url + ".json"
    if not storage.exists(engine_url):
        raise TrtsegError(f"{engine_url}: engine file not found")
    try:
        return json.loads(storage.read_bytes(meta_url))
    except FileNotFoundError:
        raise TrtsegError(f"{engine_url}: no {os.path.basename(meta_url)} beside it; build engines with `trtseg build`") from None
    except json.JSONDecodeError as e:
        raise TrtsegError(f"{meta_url}: corrupt engine metadata ({e})") from None
