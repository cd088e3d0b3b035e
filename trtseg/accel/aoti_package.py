"""The compiled network as an AOTInductor package: built once per GPU type, model, fold and engine spec, then loaded
by every later process, actor and node without TorchDynamo (``--compiled-package``; experimental, off by default).

Why: a process that runs torch.compile'd code spends seconds before its first batch even when the compiled graphs
come from the engine cache (trtseg/accel/compile_cache.py): it imports TorchDynamo and Inductor, traces the
network, checks guards and loads the cached graphs. On an NVIDIA H100 that was 12-16 s of a 36-40 s run over 16 CTs
(benchmarks/results/h100_startup_profile_16_cts_prepare_ahead_ab.json). AOTInductor compiles an exported network
ahead of time into a shared library with its kernels and its weights; torch's C++ loader
(``torch._C._aoti.AOTIModelPackageLoader``, what ``torch._inductor.aoti_load_package`` wraps) opens it without
importing Inductor's Python modules. The fused norms' kernels stay custom ops (trtseg/accel/rewrites/norm_fusion.py)
that the package calls back through torch's dispatcher: the engine imports the rewrite, which registers them, before
it loads a package.

Why experimental: on the CPU it runs as designed (tests/test_aoti_package.py). On an NVIDIA H200, a `trtseg predict`
over 16 CTs that built the package of nnU-Net's 3d_fullres network with every rewrite died (SIGSEGV) after the
export, twice, at a commit whose fused norms were torch.library.triton_op kernels compiled into the package
(benchmarks/results/h200_predict_aoti_package.json); with them as custom ops it has not run on a GPU.

Entries live in the engine cache, on any fsspec URL, beside the compile cache's:

    CACHE/aoti/<device>/<key>.pt2    the package
    CACHE/aoti/<device>/<key>.json   the key's fields, the bytes' SHA-256, and the check made when it was built;
                                     or, for a network that could not be packaged, why (later processes then use
                                     torch.compile at once instead of trying again)

The key is the compile cache's (``compile_cache.key_fields``: GPU name and compute capability, torch, Triton and
CUDA versions, model fingerprint and fold, input shape, engine spec, the fused kernels' tile configurations). The
weights are inside the package, so each fold has its own. An entry whose fields differ, whose bytes do not match
their hash, or that does not load is rebuilt, never trusted. A package is used only after its logits matched the
network's own on a batch when it was built (``MAX_RELATIVE_ERROR``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time

import torch
from fsspec.implementations.local import LocalFileSystem

from trtseg import storage
from trtseg.accel.compile_cache import entry_base, fields_differing

log = logging.getLogger(__name__)

#: a package's logits may differ from the eager network's by this fraction of the logits' largest magnitude on the
#: check batch: the same function, with Inductor's kernels summing in another order (fp16 on CUDA)
MAX_RELATIVE_ERROR = 0.02
#: seconds the child process may take to compile and check a package (110 s for nnU-Net's 3d_fullres network on an
#: NVIDIA H100's 16-core host, benchmarks/results/h100_aoti_load.json)
BUILD_TIMEOUT = 1800


class AotiPackageEntry:
    """One engine's package in the engine cache.

    ``status``: None (not looked up), "loaded", "built", "missing", "unusable: <why>" (an earlier build failed; the
    engine uses torch.compile) or "rebuilt: <why>" (a corrupt or mismatched entry, replaced by ``build``)."""

    def __init__(self, cache_url: str, fields: dict):
        self.fields = fields
        self.key, base = entry_base(cache_url, "aoti", fields)
        self.package_url, self.meta_url = base + ".pt2", base + ".json"
        self.status: str | None = None
        self.seconds: dict[str, float] = {}
        self.meta: dict | None = None  # the loaded or built entry's description

    def exists(self) -> bool:
        """Whether a usable-looking entry is there (its meta says built, for these fields), without loading it."""
        try:
            meta = json.loads(storage.read_bytes(self.meta_url))
        except Exception:
            return False
        return meta.get("fields") == self.fields and "sha256" in meta and storage.exists(self.package_url)

    def load(self, device: torch.device):
        """The package's runner (batch -> logits) for ``device``, or None (``status`` says why)."""
        t = time.perf_counter()
        try:
            meta = json.loads(storage.read_bytes(self.meta_url))
        except FileNotFoundError:
            self.status = "missing"
            return None
        except Exception as e:
            return self._refuse(f"its description is unreadable ({type(e).__name__})")
        if meta.get("fields") != self.fields:
            return self._refuse(f"made for other {', '.join(fields_differing(self.fields, meta.get('fields')))}")
        if "unusable" in meta:
            self.status = f"unusable: {meta['unusable']}"
            return None
        try:
            path = self._local_copy(meta)
        except _HashMismatch:
            return self._refuse("its bytes do not match their hash")
        except Exception as e:
            return self._refuse(f"is unreadable ({type(e).__name__})")
        try:
            runner = _runner(path, device)
        except Exception as e:
            return self._refuse(f"does not load ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})")
        self.status, self.meta = "loaded", meta
        self.seconds["load"] = round(time.perf_counter() - t, 3)
        log.info("compiled package: loaded %s (%.2f s)", self.package_url, self.seconds["load"])
        return runner

    def _local_copy(self, meta: dict) -> str:
        """A local path of the package whose bytes match the entry's hash (the C++ loader reads a local file)."""
        fs, path = storage.filesystem(self.package_url)
        if isinstance(fs, LocalFileSystem):
            if _sha256_file(path) != meta.get("sha256"):
                raise _HashMismatch
            return path
        local = os.path.join(tempfile.gettempdir(), "trtseg_aoti", f"{self.key}-{meta['sha256'][:16]}.pt2")
        if not (os.path.exists(local) and _sha256_file(local) == meta["sha256"]):
            raw = storage.read_bytes(self.package_url)
            if hashlib.sha256(raw).hexdigest() != meta["sha256"]:
                raise _HashMismatch
            os.makedirs(os.path.dirname(local), exist_ok=True)
            tmp = f"{local}.{os.getpid()}.part"
            with open(tmp, "wb") as f:
                f.write(raw)
            os.replace(tmp, local)
        return local

    def _refuse(self, why: str):
        self.status = f"rebuilt: {why}"
        log.warning("compiled package: %s %s; building it again", self.package_url, why)
        return None

    def build(self, network: torch.nn.Module, example: torch.Tensor, device: torch.device, max_autotune: bool = False):
        """Exports ``network`` on ``example`` (the batch as the engine hands it: shape, dtype, memory order), then
        compiles the package and checks it in a child process (``_build_child``), and writes the entry; returns the
        loaded runner, or None when the network cannot be packaged (the entry then says why, and ``status`` too).
        ``max_autotune``: Inductor times Triton kernels against cuDNN's (--compile max-autotune).

        Why a child process: compiling and first running a package is where a GPU run died with SIGSEGV (see the
        module docstring), which no ``except`` catches. In a child, such a death makes the entry "unusable" and
        this process goes on with torch.compile; and the child loads the package as a later process will, in a
        process that has not compiled it. The check: the package's logits against the network's own (computed
        here) on a seeded random batch like ``example``, within ``MAX_RELATIVE_ERROR``."""
        t = time.perf_counter()
        prior = self.status  # "rebuilt: <why>" is kept in the report once the new entry loads
        try:
            with tempfile.TemporaryDirectory(prefix="trtseg_aoti_") as tmp:
                with torch.inference_mode():
                    exported = torch.export.export(network, (example,))
                    torch.export.save(exported, os.path.join(tmp, "exported.pt2"))
                    del exported
                    g = torch.Generator().manual_seed(0)
                    check = torch.empty_strided(example.shape, example.stride(), dtype=example.dtype, device=device)
                    check.copy_(torch.randn(tuple(example.shape), generator=g))
                    want = network(check).float().cpu()
                self.seconds["export"] = round(time.perf_counter() - t, 2)
                # the modules that define the network's layers: importing them registers the custom ops it calls
                modules = sorted({type(m).__module__ for m in network.modules()})
                torch.save({"input": check.cpu(), "want": want, "modules": modules, "device": str(device),
                            "max_autotune": max_autotune}, os.path.join(tmp, "check.pt"))
                _run_child(tmp)
                with open(os.path.join(tmp, "result.json")) as f:
                    result = json.load(f)
                self.seconds["compile"] = result["compile_seconds"]
                with open(os.path.join(tmp, "package.pt2"), "rb") as f:
                    raw = f.read()
        except Exception as e:
            why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
            self.status = f"unusable: {why}"
            log.warning("compiled package: the network cannot be packaged (%s); torch.compile runs it", why)
            self._write_meta({"fields": self.fields, "unusable": why})
            return None
        meta = {"fields": self.fields, "sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw),
                "check": {"relative_error": result["relative_error"], "batch": list(example.shape)},
                "seconds": self.seconds}
        storage.write_bytes_atomic(self.package_url, raw)
        self._write_meta(meta)  # last: an entry is complete when its description is there
        runner = self.load(device)
        if runner is not None:
            self.status = prior if (prior or "").startswith("rebuilt") else "built"
        log.info("compiled package: built %s in %.0f s (export %.0f s, compile and check %.0f s)", self.package_url,
                 time.perf_counter() - t, self.seconds["export"], self.seconds["compile"])
        return runner

    def _write_meta(self, meta: dict) -> None:
        try:
            storage.write_bytes_atomic(self.meta_url, json.dumps(meta, indent=2).encode())
        except Exception as e:  # a cache that cannot be written costs the next process a build, not this run
            log.warning("compiled package: %s not written (%s)", self.meta_url, e)

    def describe(self) -> dict:
        return {"status": self.status, "entry": self.package_url, "seconds": self.seconds}


class _HashMismatch(Exception):
    pass


class BuildFailed(Exception):
    """The child process that compiles and checks a package failed or died; the message says how."""


def _run_child(folder: str) -> None:
    """Runs ``_build_child`` on ``folder`` in a fresh interpreter; raises BuildFailed with its last error line, or
    the signal that killed it."""
    r = subprocess.run([sys.executable, "-m", "trtseg.accel.aoti_package", folder], capture_output=True, text=True,
                       timeout=BUILD_TIMEOUT)
    if r.returncode == 0:
        return
    if r.returncode < 0:
        raise BuildFailed(f"the build process died ({signal.Signals(-r.returncode).name})")
    lines = [line for line in r.stderr.splitlines() if line.strip() and not line.startswith(" ")]
    raise BuildFailed(lines[-1] if lines else f"the build process exited with {r.returncode}")


def _build_child(folder: str) -> None:
    """In a fresh process: compiles ``folder``/exported.pt2 into ``folder``/package.pt2, loads it through the C++
    loader, runs the check batch, and writes ``folder``/result.json (the relative error and the seconds); exits
    with an error (one line) when the package's logits differ from the network's by more than
    MAX_RELATIVE_ERROR."""
    import importlib

    spec = torch.load(os.path.join(folder, "check.pt"))
    for module in spec["modules"]:  # registers the custom ops the exported graph calls
        importlib.import_module(module)
    t = time.perf_counter()
    exported = torch.export.load(os.path.join(folder, "exported.pt2"))
    path = os.path.join(folder, "package.pt2")
    torch._inductor.aoti_compile_and_package(
        exported, package_path=path, inductor_configs={"max_autotune": True} if spec["max_autotune"] else None)
    device = torch.device(spec["device"])
    x = spec["input"].to(device)  # its dtype and memory order kept
    with torch.inference_mode():
        got = _runner(path, device)(x).float().cpu()
    want = spec["want"]
    error = float((got - want).abs().max()) / (float(want.abs().max()) or 1.0)
    if not error <= MAX_RELATIVE_ERROR:  # also refuses NaN
        raise ValueError(f"its logits differ from the network's by {error:.3g} of their largest magnitude (at most "
                         f"{MAX_RELATIVE_ERROR})")
    with open(os.path.join(folder, "result.json"), "w") as f:
        json.dump({"relative_error": round(error, 6), "compile_seconds": round(time.perf_counter() - t, 2)}, f)


def _runner(path: str, device: torch.device):
    """batch -> the network's output, through the C++ loader (no Inductor or Triton imports), on the current
    stream of ``device``. The package takes the one input shape it was built for."""
    index = device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda"
                                                            else -1)
    loader = torch._C._aoti.AOTIModelPackageLoader(path, "model", False, 1, index)

    def run(batch: torch.Tensor) -> torch.Tensor:
        return loader.run([batch])[0]

    return run


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


if __name__ == "__main__":  # the build's child process (AotiPackageEntry.build)
    _build_child(sys.argv[1])
