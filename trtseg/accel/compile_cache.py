"""torch.compile's results, built once per GPU type and reused by every process, actor and node.

A compiled engine's first batches compile its graph (22-60 s for nnU-Net's 3d_fullres network, 172 s with
max-autotune, on an NVIDIA H100), again in every new process and on every node: Inductor's own cache lives on one
machine's disk. PyTorch's portable cache (``torch.compiler.save_cache_artifacts`` / ``load_cache_artifacts``)
packs Inductor's compiled graphs and autotuning results into bytes that another machine can load. trtseg keeps them
in the engine cache, on any fsspec URL, beside the ONNX graphs and TensorRT engines:

    CACHE/compile/<device>/<key>.bin    the artifacts
    CACHE/compile/<device>/<key>.json   the key's fields, the bytes' SHA-256 and what made them

The key holds what decides the compiled code: the device (GPU name and compute capability, or the CPU), the torch,
Triton and CUDA versions, the model fingerprint and fold, the input shape (batch, channels, patch), the engine
spec (precision, compile mode, layouts, rewrites) and the fused kernels' tile configurations; an 8-bit engine's
also holds its calibrated scales (``model_key_fields``). An entry whose
fields differ from the expected ones is refused and rebuilt; an entry whose bytes do not match their hash or do not
load is rebuilt, never trusted.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re

import torch

from trtseg import storage

log = logging.getLogger(__name__)


def device_slug(device: torch.device) -> str:
    """A path-safe name of the device type: the GPU's name and compute capability, or the CPU's architecture."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        name = f"{torch.cuda.get_device_name(device)}-sm{major}{minor}"
    else:
        name = f"cpu-{platform.machine()}"
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name)


def key_fields(model_fingerprint: str, fold: str, engine_text: str, input_shape, device: torch.device) -> dict:
    """Everything the compiled code depends on (see the module docstring)."""
    from importlib.metadata import PackageNotFoundError, version

    try:  # the installed distribution's version: importing Triton itself costs a process that loads a package 0.3 s
        triton_version: str | None = version("triton")
    except PackageNotFoundError:
        triton_version = None
    return {"device": device_slug(device), "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda, "model": model_fingerprint, "fold": fold, "engine": engine_text,
            "input_shape": [int(s) for s in input_shape],
            "conv_configs": os.environ.get("TRTSEG_CONV_CONFIGS")}


def model_key_fields(model, fold: str, spec, device: torch.device, input_scales: dict | None = None) -> dict:
    """``key_fields`` of one fold of ``model`` (a loaded model folder) under ``spec`` (an EngineSpec): the key of its
    compiled code, in the compile cache and as a package alike. An 8-bit engine's compiled code holds its
    calibrated ``input_scales`` as constants, and its 8-bit kernels' tile configurations: a new calibration (a
    replaced calibration volume) or other tiles must not load code compiled for the old ones."""
    shape = (max(spec.batch_size, 1), model.num_input_channels, *model.patch_size)
    fields = key_fields(model.fingerprint, fold, spec.text(), shape, device)
    if input_scales:
        fields["input_scales"] = hashlib.sha256(json.dumps(input_scales, sort_keys=True).encode()).hexdigest()[:16]
        fields["conv8_configs"] = os.environ.get("TRTSEG_CONV8_CONFIGS")
    return fields


def entry_base(cache_url: str, folder: str, fields: dict) -> tuple[str, str]:
    """(key, base URL without suffix) of an engine-cache entry for ``fields`` under ``folder``/<device>/."""
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]
    return key, storage.join(cache_url, folder, fields["device"], key)


def fields_differing(expected: dict, recorded: dict | None) -> list[str]:
    """The names of the fields whose values an entry's recorded fields do not match."""
    recorded = recorded or {}
    return sorted(k for k in set(expected) | set(recorded) if recorded.get(k) != expected.get(k))


class JsonEntry:
    """An engine-cache entry of JSON data made for ``fields``, at CACHE/``folder``/<device>/<key>.json: ``get`` gives
    its data (under ``name``) only when the entry was made for exactly these fields, else None with ``note`` saying
    why (the caller checks again); ``put`` writes it atomically, and a cache that cannot be written costs the next
    process the check again, not this run. ``what`` names the entry in log lines."""

    def __init__(self, cache_url: str, folder: str, fields: dict, name: str, what: str):
        self.fields, self.name, self.what = fields, name, what
        self.url = entry_base(cache_url, folder, fields)[1] + ".json"
        self.note: str | None = None

    def get(self):
        if not storage.exists(self.url):
            return None
        try:
            entry = json.loads(storage.read_bytes(self.url))
        except Exception as e:  # unreadable or not JSON: checked again
            self.note = f"entry {self.url} unreadable ({type(e).__name__}); checked again"
            return None
        if not isinstance(entry, dict) or entry.get("fields") != self.fields or self.name not in entry:
            self.note = f"entry {self.url} made for other fields; checked again"
            return None
        return entry[self.name]

    def put(self, data) -> None:
        try:
            storage.write_bytes_atomic(self.url, json.dumps({"fields": self.fields, self.name: data},
                                                            indent=2).encode())
        except Exception as e:
            log.warning("%s: not saved to %s (%s)", self.what, self.url, e)


class CompileCacheEntry:
    """One compiled engine's entry: ``load`` before its first compiled call, ``save`` after its warm-up.

    ``status``: None (not looked up yet), "loaded", "saved", "missing", or "rebuilt: <why>" (a corrupt or mismatched
    entry, replaced by ``save``)."""

    def __init__(self, cache_url: str, fields: dict):
        self.fields = fields
        self.key, base = entry_base(cache_url, "compile", fields)
        self.bin_url, self.meta_url = base + ".bin", base + ".json"
        self.status: str | None = None

    def load(self) -> bool:
        """Loads the entry into this process's Inductor caches; True when it did."""
        if not (storage.exists(self.bin_url) and storage.exists(self.meta_url)):
            self.status = "missing"
            return False
        try:
            meta = json.loads(storage.read_bytes(self.meta_url))
            raw = storage.read_bytes(self.bin_url)
        except Exception as e:  # unreadable: treat as corrupt
            return self._refuse(f"unreadable ({type(e).__name__})")
        if meta.get("fields") != self.fields:
            return self._refuse(f"made for other {', '.join(fields_differing(self.fields, meta.get('fields')))}")
        if hashlib.sha256(raw).hexdigest() != meta.get("sha256"):
            return self._refuse("its bytes do not match their hash")
        try:
            torch.compiler.load_cache_artifacts(raw)
        except Exception as e:
            return self._refuse(f"does not load ({type(e).__name__})")
        self.status = "loaded"
        # with the compiled code loaded, nothing is left to compile: one compile thread spares starting (and, at the
        # process's exit, stopping) Inductor's pool of compile workers, about 4 s of a one-CT process on an H100
        # (benchmarks/results/h100_startup_profile.json: TORCHINDUCTOR_COMPILE_THREADS=1 against the default)
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1
        log.info("compile cache: loaded %s", self.bin_url)
        return True

    def _refuse(self, why: str) -> bool:
        self.status = f"rebuilt: {why}"
        log.warning("compile cache: %s %s; compiling again", self.bin_url, why)
        return False

    def save(self) -> None:
        """Writes this process's compile artifacts as the entry (after the compile that ``load`` could not spare)."""
        packed = torch.compiler.save_cache_artifacts()
        if not packed:
            return
        raw, info = packed
        meta = {"fields": self.fields, "sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw),
                "artifacts": {k: len(v) for k, v in getattr(info, "artifacts", {}).items()}}
        storage.write_bytes_atomic(self.bin_url, raw)
        storage.write_bytes_atomic(self.meta_url, json.dumps(meta, indent=2).encode())
        if self.status in (None, "missing"):
            self.status = "saved"
        log.info("compile cache: saved %s (%d bytes)", self.bin_url, len(raw))

    def describe(self) -> dict:
        return {"status": self.status, "entry": self.bin_url}
