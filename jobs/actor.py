"""InferenceActor: one per GPU (or per CPU share), alive for the whole job.

It owns the expensive state: the model's engines (one per fold; for TensorRT, the execution context), the CUDA
stream the engines run on, the Gaussian, and the last volumes it was sent (so a volume crosses the object store
to each actor once, not once per chunk). Chunks of tiles come in; weighted partial logit sums go out.
"""
from __future__ import annotations

import os
import time
from collections import OrderedDict

import numpy as np
import torch

from accel.engines import create_engines
from jobs.stages import chunk_region
from trtseg import storage
from trtseg.aggregate import weight_map
from trtseg.infer import predict_tiles
from trtseg.model import NnUNetModel
from trtseg.predict import Settings
from trtseg.tile import gaussian_importance


class InferenceActor:
    def __init__(self, model: NnUNetModel, settings: Settings, name: str, torch_threads: int | None = None,
                 storage_options=None):
        storage.set_default_options(storage_options)
        self.name = name
        gpu = torch.cuda.is_available() and settings.device != "cpu"
        self.device = torch.device("cuda", 0) if gpu else torch.device("cpu")  # Ray sets CUDA_VISIBLE_DEVICES
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.model = model
        self.settings = settings
        self.engines = create_engines(model, settings.engine, self.device, settings.resolved_precision() if gpu else "fp32",
                                      settings.compile, settings.engine_cache, max(settings.batch_size, 1))
        self.gaussian = gaussian_importance(model.patch_size, self.device)
        self.mirror_axes = model.mirror_axes if settings.use_mirroring else None
        self._volumes: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.busy_seconds = 0.0  # inside infer_chunk (engine, tile gathering, weighting)
        self.engine_seconds = 0.0  # inside the engine (with mirroring), synchronized
        self.tiles = 0
        self.started = time.time()

    def _volume(self, case_id: str, data: np.ndarray, starts) -> tuple[torch.Tensor, torch.Tensor]:
        if case_id not in self._volumes:
            x = torch.from_numpy(data).to(self.device, non_blocking=True)
            w = weight_map(x.shape[1:], starts, self.gaussian)
            self._volumes[case_id] = (x, w)
            while len(self._volumes) > 2:
                self._volumes.popitem(last=False)
        self._volumes.move_to_end(case_id)
        return self._volumes[case_id]

    @torch.inference_mode()
    def infer_chunk(self, case_id: str, data: np.ndarray, all_starts, chunk_starts, partials: str = "fp16"):
        """Tiles ``chunk_starts`` of a volume -> (stats, (origin, partial (k, dz, dy, dx) numpy))."""
        t0 = time.perf_counter()
        x, w = self._volume(case_id, data, all_starts)
        patch = self.model.patch_size
        origin, shape = chunk_region(chunk_starts, patch)
        total = torch.zeros((self.model.labels.num_heads, *shape), dtype=torch.float32, device=self.device)
        bs = max(1, self.settings.batch_size)
        for engine in self.engines:
            for i in range(0, len(chunk_starts), bs):
                starts = chunk_starts[i:i + bs]
                tiles = torch.stack([x[(slice(None), *(slice(s, s + p) for s, p in zip(st, patch)))] for st in starts])
                te = time.perf_counter()
                logits = predict_tiles(engine, tiles, self.mirror_axes)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                self.engine_seconds += time.perf_counter() - te
                for tl, st in zip(logits, starts):
                    sl = tuple(slice(s - o, s - o + p) for s, o, p in zip(st, origin, patch))
                    total[(slice(None), *sl)] += tl * self.gaussian
        region = tuple(slice(o, o + n) for o, n in zip(origin, shape))
        total /= w[region]
        if len(self.engines) > 1:
            total /= len(self.engines)
        out = total.to(torch.float16 if partials == "fp16" else torch.float32).cpu().numpy()
        seconds = time.perf_counter() - t0
        self.busy_seconds += seconds
        self.tiles += len(chunk_starts)
        return {"actor": self.name, "tiles": len(chunk_starts), "seconds": seconds, "partial_bytes": int(out.nbytes),
                "pid": os.getpid()}, (origin, out)

    def stats(self) -> dict:
        return {"actor": self.name, "device": str(self.device),
                "gpu": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None,
                "engine": self.engines[0].describe(), "busy_seconds": round(self.busy_seconds, 3),
                "engine_seconds": round(self.engine_seconds, 3),
                "tiles": self.tiles, "alive_seconds": round(time.time() - self.started, 3), "pid": os.getpid()}
