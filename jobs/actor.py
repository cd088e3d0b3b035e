"""InferenceActor: one per GPU (or per CPU share), alive for the whole job.

It owns the expensive state: the model's engines (one per fold; for TensorRT, the execution context), the CUDA
stream the engines run on, the Gaussian, the volumes it was sent (each crosses the object store to an actor once),
and, per case, an accumulator of Gaussian-weighted logits on its own device.

Per case, tiles arrive in chunks (``infer_chunk``). One actor owns the case: the others send it their partial sums
once (``take_partial``, already divided by the volume's weight map, fp16 by default), and the owner adds them to
its own, exports on its device and returns only the mask (``finalize``). With one actor no logits move at all.
"""
from __future__ import annotations

import contextlib
import os
import time

import numpy as np
import torch

from accel.engines import create_engines
from jobs.stages import chunk_region, peak_rss_mb, worker_device
from trtseg import storage
from trtseg.aggregate import weight_map
from trtseg.export import export
from trtseg.infer import predict_tiles
from trtseg.model import NnUNetModel
from trtseg.predict import Settings
from trtseg.preprocess import Preprocessed
from trtseg.tile import model_gaussian


class _CaseState:
    """What an actor holds for one case: the volume, the weight map, the running sum and the tiles it covered."""

    def __init__(self, volume: torch.Tensor, weights: torch.Tensor, num_classes: int):
        self.volume = volume
        self.weights = weights
        self.sum = torch.zeros((num_classes, *volume.shape[1:]), dtype=torch.float32, device=volume.device)
        self.starts: list = []


class CaseStateLost(RuntimeError):
    """The actor no longer holds the tiles it summed for a case (it restarted): the case must be redone."""


class InferenceActor:
    def __init__(self, model: NnUNetModel, settings: Settings, name: str, torch_threads: int | None = None,
                 storage_options=None):
        storage.set_default_options(storage_options)
        self.name = name
        self.device = worker_device(settings)
        gpu = self.device.type == "cuda"
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.model = model
        self.settings = settings
        self.engines = create_engines(model, settings.engine, self.device, settings.resolved_precision() if gpu else "fp32",
                                      settings.compile, settings.engine_cache, max(settings.batch_size, 1),
                                      settings.cuda_graphs and gpu, settings.channels_last and gpu,
                                      settings.half_weights and gpu)
        # the actor's own CUDA stream: its tiles, sums and exports queue there, apart from other processes' work
        self.stream = torch.cuda.Stream(self.device) if gpu else None
        self.gaussian = model_gaussian(model, self.device)
        self.mirror_axes = model.mirror_axes if settings.use_mirroring else None
        self._cases: dict[str, _CaseState] = {}
        self.busy_seconds = 0.0  # inside infer_chunk and finalize
        self.engine_seconds = 0.0  # inside the engine (with mirroring), synchronized
        self.tiles = 0
        self.started = time.time()
        self.first_tile_at: float | None = None  # wall time of the first tile: busy fractions exclude start-up

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _case(self, case_id: str, data: np.ndarray, all_starts, prior_tiles: int) -> _CaseState:
        have = len(self._cases[case_id].starts) if case_id in self._cases else 0
        if have != prior_tiles:
            raise CaseStateLost(f"{self.name} holds {have} tiles of {case_id}, expected {prior_tiles} (it restarted)")
        if case_id not in self._cases:
            x = torch.from_numpy(data).to(self.device, non_blocking=True)
            self._cases[case_id] = _CaseState(x, weight_map(x.shape[1:], all_starts, self.gaussian),
                                              self.model.labels.num_heads)
        return self._cases[case_id]

    def _on_stream(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    @torch.inference_mode()
    def infer_chunk(self, case_id: str, data: np.ndarray, all_starts, chunk_starts, prior_tiles: int) -> dict:
        """Adds the weighted logits of the tiles at ``chunk_starts`` (all folds, mirroring) to the case's sum.

        prior_tiles: how many of the case's tiles this actor should already hold; a restarted actor holds fewer,
        and says so (CaseStateLost) instead of silently summing an incomplete case.
        """
        with self._on_stream():
            return self._infer_chunk(case_id, data, all_starts, chunk_starts, prior_tiles)

    def _infer_chunk(self, case_id: str, data: np.ndarray, all_starts, chunk_starts, prior_tiles: int) -> dict:
        t0 = time.perf_counter()
        self.first_tile_at = self.first_tile_at or time.time()
        st = self._case(case_id, data, all_starts, prior_tiles)
        patch = self.model.patch_size
        bs = max(1, self.settings.batch_size)
        for engine in self.engines:
            for i in range(0, len(chunk_starts), bs):
                starts = chunk_starts[i:i + bs]
                tiles = torch.stack([st.volume[(slice(None), *(slice(s, s + p) for s, p in zip(t, patch)))] for t in starts])
                te = time.perf_counter()
                logits = predict_tiles(engine, tiles, self.mirror_axes, self.model.nnunet_version == 1)
                self._sync()
                self.engine_seconds += time.perf_counter() - te
                for tl, t in zip(logits, starts):
                    st.sum[(slice(None), *(slice(s, s + p) for s, p in zip(t, patch)))] += tl * self.gaussian
        st.starts += list(chunk_starts)
        self._sync()
        seconds = time.perf_counter() - t0
        self.busy_seconds += seconds
        self.tiles += len(chunk_starts)
        return {"actor": self.name, "tiles": len(chunk_starts), "seconds": seconds, "pid": os.getpid()}

    def _normalized(self, st: _CaseState, region: tuple[slice, ...]) -> torch.Tensor:
        out = st.sum[(slice(None), *region)] / st.weights[region]
        return out / len(self.engines) if len(self.engines) > 1 else out

    def _pop(self, case_id: str, expected_tiles: int) -> _CaseState:
        st = self._cases.pop(case_id, None)
        have = len(st.starts) if st else 0
        if have != expected_tiles:
            raise CaseStateLost(f"{self.name} holds {have} tiles of {case_id}, expected {expected_tiles} (it restarted)")
        assert st is not None
        return st

    def drop(self, case_id: str) -> None:
        """Forgets a case (the driver redoes it elsewhere)."""
        self._cases.pop(case_id, None)

    @torch.inference_mode()
    def take_partial(self, case_id: str, expected_tiles: int, dtype: str = "fp16") -> tuple:
        """This actor's share of a case, for the owner: (origin, (k, dz, dy, dx) numpy), divided by the weight map."""
        st = self._pop(case_id, expected_tiles)
        origin, shape = chunk_region(st.starts, self.model.patch_size)
        region = tuple(slice(o, o + n) for o, n in zip(origin, shape))
        part = self._normalized(st, region).to(torch.float16 if dtype == "fp16" else torch.float32)
        return origin, part.cpu().numpy()

    @torch.inference_mode()
    def finalize(self, case_id: str, expected_tiles: int, meta: dict, light_model: NnUNetModel, *partials):
        """Own sum + the other actors' partials -> export on this device -> (stats, the mask (z, y, x) numpy)."""
        with self._on_stream():
            return self._finalize(case_id, expected_tiles, meta, light_model, *partials)

    def _finalize(self, case_id: str, expected_tiles: int, meta: dict, light_model: NnUNetModel, *partials):
        t0 = time.perf_counter()
        st = self._pop(case_id, expected_tiles)
        logits = self._normalized(st, tuple(slice(0, n) for n in st.sum.shape[1:]))
        del st
        for origin, arr in partials:
            region = tuple(slice(o, o + n) for o, n in zip(origin, arr.shape[1:]))
            logits[(slice(None), *region)] += torch.from_numpy(arr).to(self.device, torch.float32)
        logits = logits[(slice(None), *(slice(a, b) for a, b in meta["crop"]))]
        mask = export(logits, Preprocessed(data=torch.empty(0), **meta["pre"]), light_model).mask
        seconds = time.perf_counter() - t0
        self.busy_seconds += seconds
        return {"export_seconds": seconds, "partial_bytes": int(sum(a.nbytes for _, a in partials)),
                "owner": self.name}, mask

    def stats(self) -> dict:
        return {"actor": self.name, "device": str(self.device),
                "gpu": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None,
                "engine": self.engines[0].describe(), "busy_seconds": round(self.busy_seconds, 3),
                "engine_seconds": round(self.engine_seconds, 3),
                "engine_busy_since_first_tile": round(self.engine_seconds / (time.time() - self.first_tile_at), 4)
                if self.first_tile_at else None,
                "tiles": self.tiles, "alive_seconds": round(time.time() - self.started, 3), "pid": os.getpid(),
                "node_id": _node_id(),
                "peak_rss_mb": peak_rss_mb(),
                "peak_gpu_memory_mb": round(torch.cuda.max_memory_allocated(self.device) / 2 ** 20, 1)
                if self.device.type == "cuda" else None}


def _node_id() -> str | None:
    """The Ray node this actor runs on (None outside Ray)."""
    try:
        import ray
        return ray.get_runtime_context().get_node_id()
    except Exception:
        return None
