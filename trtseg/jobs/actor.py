"""InferenceActor: one per GPU (or per CPU share), alive for the whole job.

It owns the expensive state: the model's engines (one per fold; for TensorRT, the execution context), the CUDA
stream the engines run on, the Gaussian, the volumes it was sent (each crosses the object store to an actor once),
and, per case, an accumulator of Gaussian-weighted logits on its own device.

Per case, tiles arrive in chunks (``infer_chunk``). One actor owns the case: the others send it their partial sums
once (``take_partial``, already divided by the volume's weight map, fp16 by default), and the owner adds them to
its own, exports on its device and returns only the mask (``finalize``). With one actor no logits move at all.

Keeping the GPU fed:
- the engine is warmed up (compiled, autotuned) when the actor starts, while the first volumes are read, on the
  thread that then runs the tiles (``warm_up``: cuDNN's autotuning is kept per thread);
- ``prefetch`` copies a case's volume to the GPU on a third thread and stream before its first chunk runs;
- ``infer_chunk`` returns once its chunk is queued on the actor's stream and the chunk QUEUED_CHUNKS before it has
  finished, so the GPU has work while Ray delivers the next call; engine time is measured with CUDA events, never
  by synchronizing each batch;
- ``finalize`` and ``take_partial`` run in their own concurrency group ("export"), on a second thread and a
  second CUDA stream, so one case's export overlaps the next case's tiles;
- its GPU time (engine, gaps, busy share) is read from CUDA events (trtseg/jobs/timeline.py) and reported by ``stats``.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from concurrent.futures import Future

import numpy as np
import ray
import torch

from trtseg.accel.engines import create_engines
from trtseg.jobs.stages import peak_rss_mb, worker_device
from trtseg.jobs.timeline import GpuTimeline
from trtseg import storage, transfer
from trtseg.aggregate import Merger
from trtseg.ensemble import STAGE, Combiner, ModelSet
from trtseg.export import export_on_device, exported_on_host
from trtseg.infer import run_tiles
from trtseg.model import NnUNetModel
from trtseg.options import Settings
from trtseg.preprocess import Preprocessed
from trtseg.tile import model_gaussian
from trtseg.window import WindowPlan

# chunks an actor leaves queued on its GPU when infer_chunk returns: enough to cover a Ray call between chunks
# (the engine is busy 0.976 of the GPU's span with 2 on an NVIDIA H100, benchmarks/results/h100_dataset_throughput_fast*.json)
QUEUED_CHUNKS = 2
EXPORT_GROUP, UPLOAD_GROUP = "export", "upload"
CONCURRENCY_GROUPS = {EXPORT_GROUP: 1, UPLOAD_GROUP: 1}  # ray.remote(concurrency_groups=...) of the actor class


class _CaseState:
    """What an actor holds for one case: the volume on its device and the case's Merger (the running sums and the
    tiles it covered; the weight map is made from the plan when the sums are normalized, on the export thread)."""

    def __init__(self, volume: torch.Tensor, merger: Merger):
        self.volume = volume
        self.merger = merger


class CaseStateLost(RuntimeError):
    """The actor no longer holds the tiles it summed for a case (it restarted): the case must be redone."""


class InferenceActor:
    def __init__(self, model: "ModelSet | NnUNetModel", settings: Settings, name: str, torch_threads: int | None = None,
                 storage_options=None, diagnostics: bool = False):
        storage.set_default_options(storage_options)
        self.name = name
        self.device = worker_device(settings)
        gpu = self.device.type == "cuda"
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.models = ModelSet.of(model)
        self.model = self.models.models[0]
        self.settings = settings
        # every model of the run (ensemble members, a cascade's stages), each with an engine per fold
        self.engines_per_pass = [create_engines(m, settings.engine, self.device) for m in self.models.models]
        self.engines = self.engines_per_pass[0]
        # the actor's own CUDA streams, apart from other processes' work: tiles and sums queue on one, exports on
        # the other (a second thread, see finalize)
        self.stream = torch.cuda.Stream(self.device) if gpu else None
        self.export_stream = torch.cuda.Stream(self.device) if gpu else None
        self.copy_stream = torch.cuda.Stream(self.device) if gpu else None
        self.gaussians = [model_gaussian(m, self.device) for m in self.models.models]
        self._cases: dict[str, _CaseState] = {}
        # per case attempt, as owner: the stages' masks and the ensemble's running sum (trtseg/ensemble.py)
        self._combiners: dict[str, Combiner] = {}
        self._uploads: dict[str, Future] = {}  # case -> (volume on the device, copy-done event), from prefetch
        # cases whose volume the tile thread took (kept for the actor's life, a few bytes each: a prefetch that
        # arrives after its case was finished or dropped does nothing); a redone case comes back under a new key
        self._taken: set[str] = set()
        self._lock = threading.Lock()
        self.busy_seconds = 0.0  # inside infer_chunk and finalize
        self.timeline = GpuTimeline(self.stream)  # engine time, gaps and GPU-busy share, from CUDA events
        # host seconds at case starts: from the previous infer_chunk's return to the new case's call, and in its set-up
        self.case_start_host_seconds = {"between_calls": 0.0, "setup": 0.0}
        self._returned_at: float | None = None
        self._peak_gpu_mb = 0.0  # over the actor's life (the per-case counter is reset at each export)
        # the thread that last ran tiles, exports and uploads (three, in Ray), and the first warm-up's (the tiles')
        self._threads: dict[str, str] = {}
        # --diagnostics: host times of case starts and exports in stats()["trace"], to study the GPU's gaps
        self._trace: list | None = [] if diagnostics else None
        self._chunks_done: deque = deque()  # CUDA events: the ends of the chunks still queued on the GPU
        self.tiles = 0
        self.started = time.time()
        self._t0 = time.perf_counter()
        self.first_tile_at: float | None = None  # wall time of the first tile: busy fractions exclude start-up
        self.warmup_seconds = 0.0
        self._warm_thread: int | None = None  # the thread whose cuDNN autotuning the engines hold (see warm_up)

    def warm_up(self) -> float:
        """Compiles and autotunes the engines (GPU actors) on the thread that runs the tiles; returns the seconds.

        The driver calls it first, while its first prepare tasks read volumes; ``infer_chunk`` calls it too, for an
        actor that Ray restarted. It must run on the tile thread: PyTorch keeps cuDNN's autotuning results per
        thread (thread-local benchmark caches). Warmed up in the constructor's thread, the engines autotuned again
        on their first real tiles, beside the job's other GPU work, and kept the kernels those timings picked."""
        self._threads.setdefault("warm_up", threading.current_thread().name)  # the first call's: the driver's
        if self.device.type != "cuda" or self._warm_thread == threading.get_ident():
            return self.warmup_seconds
        batch = max(self.settings.engine.batch_size, 1)
        with self._on_stream(), torch.inference_mode():
            for m, engines in zip(self.models.models, self.engines_per_pass):
                shape = (batch, m.num_input_channels, *m.patch_size)
                self.warmup_seconds += sum(e.warm_up(shape) for e in engines)
        self._warm_thread = threading.get_ident()
        return self.warmup_seconds

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _case(self, case_id: str, data: np.ndarray, plan: WindowPlan, prior_tiles: int, index: int) -> _CaseState:
        have = len(self._cases[case_id].merger.covered) if case_id in self._cases else 0
        if have != prior_tiles:
            raise CaseStateLost(f"{self.name} holds {have} tiles of {case_id}, expected {prior_tiles} (it restarted)")
        if case_id not in self._cases:
            x = self._take_upload(case_id, data)
            merger = Merger(plan, self.models.models[index].labels.num_heads, self.gaussians[index],
                            len(self.engines_per_pass[index]), self.settings.window.accumulate)
            self._cases[case_id] = _CaseState(x, merger)
        return self._cases[case_id]

    @ray.method(concurrency_group=UPLOAD_GROUP)
    def prefetch(self, case_id: str, data: np.ndarray) -> None:
        """Copies a case's volume to the device ahead of its first chunk, on the upload thread and the copy stream,
        while the tile thread works on earlier cases. A no-op on a CPU actor."""
        self._threads[UPLOAD_GROUP] = threading.current_thread().name
        if self.copy_stream is None:
            return
        with self._lock:
            if case_id in self._taken or case_id in self._uploads:
                return  # the tile thread got there first, or a duplicate call
            pending: Future = Future()
            self._uploads[case_id] = pending
        try:
            pending.set_result(self._copy_to_device(data))
        except BaseException as e:  # the case's first chunk raises it
            pending.set_exception(e)

    def _copy_to_device(self, data: np.ndarray) -> tuple[torch.Tensor, torch.cuda.Event]:
        assert self.copy_stream is not None
        with torch.cuda.stream(self.copy_stream):
            x = transfer.to_device(data, self.device)
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        return x, done

    def _take_upload(self, case_id: str, data: np.ndarray) -> torch.Tensor:
        """The case's volume on the device: the prefetched copy (waiting for a prefetch under way), else copied now
        on the copy stream. The tile stream waits for the copy on the GPU, not the host."""
        if self.copy_stream is None:
            return torch.from_numpy(data).to(self.device)
        with self._lock:
            pending = self._uploads.pop(case_id, None)
            self._taken.add(case_id)
        x, done = pending.result() if pending is not None else self._copy_to_device(data)
        self.stream.wait_event(done)
        x.record_stream(self.stream)
        return x

    def _on_stream(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    @torch.inference_mode()
    def infer_chunk(self, case_id: str, data: np.ndarray, plan: WindowPlan, chunk_starts, prior_tiles: int,
                    index: int = 0) -> dict:
        """Adds the weighted logits of the tiles at ``chunk_starts`` (all folds of pass ``index``'s model,
        mirroring) to the case's sum. case_id names the case attempt and pass ("CASE#ATTEMPT/PASS").

        prior_tiles: how many of the case's tiles this actor should already hold; a restarted actor holds fewer,
        and says so (CaseStateLost) instead of silently summing an incomplete case.
        """
        self.warm_up()
        with self._on_stream():
            return self._infer_chunk(case_id, data, plan, chunk_starts, prior_tiles, index)

    def _infer_chunk(self, case_id: str, data: np.ndarray, plan: WindowPlan, chunk_starts, prior_tiles: int,
                     index: int) -> dict:
        t0 = time.perf_counter()
        self.first_tile_at = self.first_tile_at or time.time()
        self._threads["tiles"] = threading.current_thread().name
        new_case = case_id not in self._cases
        entry = self.timeline.mark() if new_case else None
        st = self._case(case_id, data, plan, prior_tiles, index)
        if new_case and self._returned_at is not None:
            self.case_start_host_seconds["between_calls"] += t0 - self._returned_at
            self.case_start_host_seconds["setup"] += time.perf_counter() - t0
            if self._trace is not None:
                self._trace.append(("case", case_id, round(self._returned_at - self._t0, 4), round(t0 - self._t0, 4),
                                    round(time.perf_counter() - self._t0, 4)))
        run_tiles(self.engines_per_pass[index], st.volume, plan, chunk_starts, self.settings.engine.batch_size, st.merger,
                  lambda kind: self.timeline.batch(kind, entry if kind == "case" else None),
                  first="case" if new_case else "chunk")
        self._keep_chunks_queued()
        self._returned_at = time.perf_counter()
        seconds = self._returned_at - t0
        with self._lock:  # the tile and export threads both add to it
            self.busy_seconds += seconds
        self.tiles += len(chunk_starts)
        return {"actor": self.name, "tiles": len(chunk_starts), "seconds": seconds, "pid": os.getpid()}

    def _keep_chunks_queued(self) -> None:
        """Leaves this chunk queued on the GPU and waits for the one QUEUED_CHUNKS before it: the GPU always has work
        in hand while Ray delivers the next call and the next case starts (a case's last chunk can be a few tiles)."""
        if self.stream is None:
            return
        done = torch.cuda.Event()
        done.record(self.stream)
        self._chunks_done.append(done)
        while len(self._chunks_done) > QUEUED_CHUNKS:
            self._chunks_done.popleft().synchronize()
        self.timeline.collect()

    def _export_stream(self, st: _CaseState):
        """Runs a case's export on the export stream, after everything queued for it on the tile stream; its tensors
        stay allocated until the export stream is done with them."""
        if self.export_stream is None:
            return contextlib.nullcontext()
        self.export_stream.wait_stream(self.stream)
        for t in (st.merger.sum, st.volume):
            t.record_stream(self.export_stream)
        return torch.cuda.stream(self.export_stream)

    def _pop(self, case_id: str, expected_tiles: int) -> _CaseState:
        st = self._cases.pop(case_id, None)
        have = len(st.merger.covered) if st else 0
        if have != expected_tiles:
            raise CaseStateLost(f"{self.name} holds {have} tiles of {case_id}, expected {expected_tiles} (it restarted)")
        assert st is not None
        return st

    def drop(self, case_id: str) -> None:
        """Forgets a case attempt ("CASE#ATTEMPT"): each pass's sums and volume, and its combiner (the driver redoes
        it elsewhere)."""
        self._combiners.pop(case_id, None)
        for key in [k for k in self._cases if k.split("/")[0] == case_id]:
            self._cases.pop(key, None)
        with self._lock:
            for key in [k for k in self._uploads if k.split("/")[0] == case_id]:
                self._uploads.pop(key, None)
                self._taken.add(key)

    # no decorator goes under @ray.method: with one (torch.inference_mode) Ray 2.60 ran the method in the default
    # group, on the tile thread, behind every chunk queued there (the GPU ran dry at each case start)
    @ray.method(concurrency_group=EXPORT_GROUP)
    def take_partial(self, case_id: str, expected_tiles: int, dtype: str = "fp16") -> tuple:
        """This actor's share of a case, for the owner: (origin, (k, dz, dy, dx) numpy), divided by the weight map."""
        self._threads[EXPORT_GROUP] = threading.current_thread().name
        st = self._pop(case_id, expected_tiles)
        with self._export_stream(st), torch.inference_mode():
            started = self.timeline.export_started(self.export_stream)
            origin, part = st.merger.partial(torch.float16 if dtype == "fp16" else torch.float32)
            self.timeline.export_done(started, self.export_stream)
            return origin, transfer.to_host(part)

    @ray.method(concurrency_group=EXPORT_GROUP)
    def finalize(self, case_id: str, expected_tiles: int, meta: dict, *partials):
        """Own sum + the other actors' partials -> export on this device -> into the case's Combiner.

        Returns (stats, mask, probabilities): after the last pass the case's mask (z, y, x) numpy and, with
        --save-probabilities, its probabilities (k, z, y, x) float32 numpy; after a cascade's stage that stage's
        mask (the next pass's prepare task takes it); after an earlier ensemble member (None, None): its
        probabilities stay here, on the device, summed. stats["more"]: passes follow."""
        t0 = time.perf_counter()
        self._threads[EXPORT_GROUP] = threading.current_thread().name
        st = self._pop(case_id, expected_tiles)
        with self._export_stream(st), torch.inference_mode():
            started = self.timeline.export_started(self.export_stream)
            st.volume = torch.empty(0)  # freed before the export allocates
            logits = st.merger.finalize(partials)
            del st
            return self._export(logits, t0, started, case_id.split("/")[0], meta, partials)

    def _export(self, logits: torch.Tensor, t0: float, started, case_key: str, meta: dict, partials):
        index, save = meta.get("index", 0), self.settings.output.save_probabilities
        model = self.models.models[index]
        combiner = self._combiners.setdefault(case_key, Combiner(self.models, save))
        combiner.add(index, *export_on_device(logits, Preprocessed(data=torch.empty(0), **meta["pre"]), model,
                                              self.models.needs_probabilities(index, save),
                                              self.settings.window.accumulate == "fp16"))
        more = index + 1 < len(self.models.models)
        if not more:
            on_device = combiner.result()
            del self._combiners[case_key]
        elif self.models.roles[index] == STAGE:
            on_device = combiner.stage_masks.pop(index), None  # only the next prepare task needs it
        else:
            on_device = None, None
        self.timeline.export_done(started, self.export_stream)
        t1 = time.perf_counter()
        exported = exported_on_host(*on_device, self.models) if on_device[0] is not None else None
        if self._trace is not None:
            self._trace.append(("export", meta.get("case_id"), round(t0 - self._t0, 4), round(t1 - self._t0, 4),
                                round(time.perf_counter() - self._t0, 4)))
        seconds = time.perf_counter() - t0
        with self._lock:  # the tile and export threads both add to it
            self.busy_seconds += seconds
        probabilities = exported.probabilities if exported is not None else None
        probability_bytes = int(probabilities.nbytes) if probabilities is not None else 0
        return {"export_seconds": seconds, "partial_bytes": int(sum(a.nbytes for _, a in partials)),
                "probability_bytes": probability_bytes, "more": more,
                "owner": self.name, "peak_gpu_memory_mb": self._case_peak_gpu_mb()}, \
            exported.mask if exported is not None else None, probabilities

    def _case_peak_gpu_mb(self) -> float | None:
        """The most GPU memory this actor had allocated since the previous case's export ended: the case's volume,
        sum and export, with the next case's start that overlaps them. PyTorch's peak counter restarts here; the
        actor keeps the overall peak."""
        if self.device.type != "cuda":
            return None
        peak = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        torch.cuda.reset_peak_memory_stats(self.device)
        self._peak_gpu_mb = max(self._peak_gpu_mb, peak)
        return round(peak, 1)

    def stats(self) -> dict:
        """The actor's counters. The GPU's shares (see trtseg/jobs/timeline.py) are over its span, from the first engine
        call's start to the last one's end: start-up, warm-up and the last case's export and write are left out.
        engine_busy_in_span: the engine alone; gpu_busy_in_span: any of the actor's GPU work (tiles and exports)."""
        self._sync()
        t = self.timeline.summary()
        gpu = self.device.type == "cuda"
        engine_seconds = t["engine_seconds"]
        return {"actor": self.name, "device": str(self.device),
                "gpu": torch.cuda.get_device_name(self.device) if gpu else None,
                "engine": self.engines[0].report(), "busy_seconds": round(self.busy_seconds, 3),
                "engine_seconds": engine_seconds, "warmup_seconds": round(self.warmup_seconds, 3),
                "engine_busy_since_first_tile": round(engine_seconds / (time.time() - self.first_tile_at), 4)
                if self.first_tile_at else None, "first_tile_at": self.first_tile_at,
                "engine_busy_in_span": t.get("engine_busy_in_span"),
                "gpu_busy_in_span": t.get("gpu_busy_in_span"),
                "tile_work_in_span": t.get("tile_work_in_span"),
                "engine_span_seconds": t.get("span_seconds"),
                "engine_gap_seconds": t.get("gap_seconds"),
                "case_gap_seconds": t.get("case_gap_seconds"),
                "case_start_host_seconds": {k: round(v, 3) for k, v in self.case_start_host_seconds.items()},
                "cuda_allocator": _allocator_counts(self.device) if gpu else None,
                "threads": dict(self._threads),
                **({"trace": self._trace} if self._trace is not None else {}),
                "tiles": self.tiles, "alive_seconds": round(time.time() - self.started, 3), "pid": os.getpid(),
                "node_id": _node_id(),
                "peak_rss_mb": peak_rss_mb(),
                "peak_gpu_memory_mb": round(max(self._peak_gpu_mb, torch.cuda.max_memory_allocated(self.device) / 2 ** 20), 1)
                if gpu else None}


def _allocator_counts(device: torch.device) -> dict:
    """How often PyTorch's caching allocator went to the driver (cudaMalloc / cudaFree) or retried after a failure."""
    m = torch.cuda.memory_stats(device)
    return {k: m.get(k) for k in ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")}


def _node_id() -> str | None:
    """The Ray node this actor runs on (None outside Ray)."""
    try:
        import ray
        return ray.get_runtime_context().get_node_id()
    except Exception:
        return None
