"""The single-process path: every stage of a case in this process, on one device.

``Predictor`` holds the model and one engine per fold; ``predict_case`` runs the shared case stages
(``trtseg.pipeline``: prepare, then the sliding window of ``trtseg.infer.run_tiles`` into one
``trtseg.aggregate.Merger``, export, write) and returns the case's report entry. The Ray job (trtseg/jobs/) runs the same
functions spread over processes, so the same settings give the same masks, stamps, skips and report.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from trtseg.accel.engine import Engine
from trtseg.accel.engines import create_engines
from trtseg import storage
from trtseg.dataset import Case
from trtseg.errors import one_line
from trtseg.ensemble import Combiner, ModelSet
from trtseg.export import export_on_device, exported_on_host
from trtseg.infer import window_logits
from trtseg.model import NnUNetModel
from trtseg.options import Settings
from trtseg.pipeline import CaseReport, prepare_case, sync, write_case
from trtseg.preprocess import Preprocessed
from trtseg.read import CaseImage
from trtseg.tile import model_gaussian
from trtseg.window import WindowPlan, plan_window

CaseResult = CaseReport  # the name earlier releases used


@dataclass
class Predicted:
    """A case predicted but not yet written: ``mask`` (z, y, x) and ``probabilities`` (labels, z, y, x) are host
    arrays in the image's own geometry (None for an empty image, which ``write_case`` fills)."""

    case: Case
    meta: dict
    mask: "np.ndarray | None"
    probabilities: "np.ndarray | None"
    tiles: int


class Predictor:
    """The run's models (one folder, an ensemble, a cascade's stages) as engines on one device, one engine per fold,
    and the sliding window over them."""

    def __init__(self, model: "NnUNetModel | ModelSet", settings: Settings, engines: list[Engine] | None = None):
        self.models = ModelSet.of(model)
        self.model = self.models.models[0]
        self.settings = settings
        self.device = settings.engine.resolved_device()
        if engines is not None and len(self.models.models) != 1:
            raise ValueError("engines can be given for one model only")
        self.engines_per_pass = [engines] if engines is not None else \
            [create_engines(m, settings.engine, self.device) for m in self.models.models]
        self.engines = self.engines_per_pass[0]
        self.gaussians = [model_gaussian(m, self.device) for m in self.models.models]

    @torch.inference_mode()
    def window_logits(self, volume: torch.Tensor, plan: WindowPlan, index: int = 0) -> torch.Tensor:
        """Logits (k, z, y, x) float32 of a padded volume (c, z, y, x) over its unpadded grid, by the model of pass
        ``index``, mean over its folds."""
        return window_logits(self.engines_per_pass[index], volume, plan, self.models.models[index].labels.num_heads,
                             self.gaussians[index], self.settings.engine.batch_size, self.settings.window.accumulate,
                             self.device)

    def logits(self, data: torch.Tensor) -> torch.Tensor:
        """Sliding-window logits (k, z, y, x) float32 of preprocessed ``data`` (c, z, y, x), mean over folds."""
        w = self.settings.window
        return self.window_logits(*plan_window(data, self.model, w.step_size, w.use_mirroring))

    @torch.inference_mode()
    def predict_case(self, case: Case, output_folder: str,
                     storage_options: storage.StorageOptions | None = None, image: CaseImage | None = None,
                     read_seconds: float = 0.0) -> CaseReport:
        """Reads (unless ``image``, read ahead in ``read_seconds``, is given), predicts and writes one case. Bad
        input fails this case only: no output file is written."""
        done = self.infer_case(case, storage_options, image, read_seconds)
        return done if isinstance(done, CaseReport) else self.write(done, output_folder, storage_options)

    def infer_case(self, case: Case, storage_options: storage.StorageOptions | None = None,
                   image: CaseImage | None = None, read_seconds: float = 0.0,
                   prepared: "tuple[dict, torch.Tensor | None] | None" = None) -> "Predicted | CaseReport":
        """Everything of ``predict_case`` before the write: the mask (z, y, x) and probabilities on the host, or the
        case's failed report. ``write`` finishes it, in this thread or another (``run_in_process`` writes one
        case behind the GPU). ``prepared``: the first pass's (meta, padded volume on this device) as
        ``prepare_case`` gave it in another thread (``read_ahead``)."""
        if prepared is not None:
            meta, volume = prepared
            if volume is not None and volume.is_cuda:  # made on the reader's stream, read on this one from now on
                volume.record_stream(torch.cuda.current_stream(volume.device))
        else:
            meta, volume, image = prepare_case(case, self.models, self.settings, self.device, storage_options,
                                               to_host=False, image=image)
        if read_seconds:
            meta["seconds"]["read"] = read_seconds
        seconds = meta["seconds"]
        if meta.get("error"):
            return CaseReport(case.case_id, "failed", error=meta["error"], seconds=seconds, reason=case.reason)
        mask = probabilities = None
        tiles = 0
        if not meta.get("empty"):
            try:
                combiner = Combiner(self.models, self.settings.output.save_probabilities)
                for index in range(len(self.models.models)):
                    if index:  # the next model's preprocessing of the image already read (a stage's mask on the device)
                        step, volume, _ = prepare_case(case, self.models, self.settings, self.device,
                                                       storage_options, False, index,
                                                       combiner.previous_mask(index), image)
                        _add_seconds(seconds, step["seconds"])
                        if step.get("error"):
                            return CaseReport(case.case_id, "failed", error=step["error"], seconds=seconds)
                    else:
                        step = meta
                    tiles += len(step["plan"].starts)
                    self._run_pass(index, step, volume, combiner, seconds)
                    del volume
                t = time.perf_counter()
                result = exported_on_host(*combiner.result(), self.models)
                mask, probabilities = result.mask, result.probabilities
                seconds["export"] += time.perf_counter() - t
            except Exception as e:  # an engine or export failure fails this case, named, not the run
                return CaseReport(case.case_id, "failed", error=storage.redact(f"{case.files[0]}: {one_line(e)}"),
                                  seconds=seconds)
        return Predicted(case, meta, mask, probabilities, tiles)

    def write(self, done: "Predicted", output_folder: str,
              storage_options: storage.StorageOptions | None = None) -> CaseReport:
        """Writes what ``infer_case`` made (host arrays only: safe in another thread) and returns the report entry."""
        case, meta, seconds = done.case, done.meta, done.meta["seconds"]
        written = write_case(meta, self.models, self.settings, output_folder, storage_options, done.mask,
                             done.probabilities)
        seconds.update(written["seconds"])
        if written.get("error"):
            return CaseReport(case.case_id, "failed", error=written["error"], seconds=seconds)
        return CaseReport(case.case_id, "ok", output=written["output"], seconds=seconds, reason=case.reason,
                          tiles=done.tiles, postprocessing=written.get("postprocessing"))

    def _run_pass(self, index: int, step: dict, volume: torch.Tensor, combiner: Combiner, seconds: dict) -> None:
        """One model's sliding window and export on the device, into the case's Combiner."""
        t = time.perf_counter()
        logits = self.window_logits(volume, step["plan"], index)
        sync(self.device)
        seconds["infer"] = seconds.get("infer", 0.0) + time.perf_counter() - t
        t = time.perf_counter()
        model = self.models.models[index]
        pre = Preprocessed(data=torch.empty(0), **step["pre"])
        with_probabilities = self.models.needs_probabilities(index, self.settings.output.save_probabilities)
        half = self.settings.window.accumulate == "fp16"
        combiner.add(index, *export_on_device(logits, pre, model, with_probabilities, half))
        sync(self.device)
        seconds["export"] = seconds.get("export", 0.0) + time.perf_counter() - t


def _add_seconds(into: dict, more: dict) -> None:
    for k, v in more.items():
        into[k] = into.get(k, 0.0) + v


def predict_folder(input_url: str, output_url: str, model_folder: "str | list[str] | NnUNetModel | ModelSet", folds: list[str] | None = None,
                   checkpoint_name: str = "checkpoint_final.pth", settings: Settings | None = None,
                   storage_options: storage.StorageOptions | None = None, limit: int | None = None,
                   dry_run: bool = False, overwrite: bool = False, progress_bar: bool = True, log=print,
                   allow_empty: bool = True, input_identity: str = "metadata", shard: str | None = None) -> dict:
    """Single-process prediction of every case in ``input_url``; writes OUTPUT/run_report.json, returns the report.

    The same case stages, stamps, skips and report as the Ray job (``trtseg.pipeline``). Cases fail one at a time:
    a bad case is reported with its error and the others still run.
    """
    from trtseg.dataset import list_cases
    from trtseg.model_folder import load_models
    from trtseg import pipeline
    from trtseg.pipeline import check_cascade, select_cases, with_postprocessing

    settings = (settings or Settings()).for_input(input_url)
    t0 = time.perf_counter()
    if not dry_run:
        storage.check_writable(output_url, storage_options)
        storage.remove_stale_parts(output_url, storage_options)
    model = model_folder if isinstance(model_folder, (NnUNetModel, ModelSet)) else \
        load_models(model_folder, folds, checkpoint_name)
    model = with_postprocessing(model, settings, storage_options)
    check_cascade(model, settings)
    cases = pipeline.shard(list_cases(input_url, model.num_image_channels, storage_options, allow_empty), shard)
    if limit is not None:
        cases = cases[:limit]
    todo, results = select_cases(cases, output_url, model, settings, overwrite, storage_options, input_identity)
    if dry_run:
        return dry_run_listing(todo, results, log)
    source = model_folder if isinstance(model_folder, (str, list)) else model.folder
    return run_in_process(model, source, settings, cases, todo, results, output_url, storage_options, progress_bar,
                          t0, {"mode": "single-process", "shard": shard})


#: the fast path's parts a small run leaves off: two whose start-up it does not earn back, compiled code (about 6 s
#: to load from the engine cache, 25-60 s to compile) and the fused norms' Triton kernels (about 4 s to load in each
#: process); and channels-last (with fold-convolutions, which needs it), which pays only beside those two: eager,
#: PyTorch's own InstanceNorm on channels-last 3-D tensors made the network slower than fp16 autocast, 3.97 s
#: against 2.21 s of inference for one 512x512x240 CT on an NVIDIA H100
#: (benchmarks/results/h100_predict_vs_nnunet_one_ct.json, h100_startup_profile_eager_no_fuse.json)
SMALL_RUN_OFF = ("compile", "fuse-norms", "channels-last")


def small_run_settings(model: ModelSet, settings: Settings, n_cases: int) -> tuple[Settings, str | None]:
    """``settings`` with the fast path's SMALL_RUN_OFF parts left off when the run makes fewer than
    ``settings.engine.compile_from`` network passes over whole cases (cases, times 2 per mirrored axis), and why
    (None when unchanged). Together they save about 0.9 s per 512x512x240 CT without mirroring, against seconds of
    start-up (see SMALL_RUN_OFF): on an NVIDIA H100, one CT without mirroring took 15.9 s compiled, 14.5 s eager
    with the fused norms and 10.7 s eager without them, each a whole process with a warm engine cache (python -m
    benchmarks.predict_vs_nnunet; python -m benchmarks.startup_profile [--flags=--no-fuse-norms]). An explicit
    --compile is kept, and so are the parts when an earlier run left compiled packages for them in the engine cache
    (trtseg.accel.fast_path.packages_ready), whose loading costs no such start-up."""
    spec = settings.engine
    if not spec.fast or spec.compile or spec.compile_from <= 0 or spec.resolved_device().type != "cuda":
        return settings, None
    left = [p for p in SMALL_RUN_OFF if p not in spec.off]
    axes = (getattr(model.models[-1], "mirror_axes", None) or ()) if settings.window.use_mirroring else ()
    passes = n_cases * 2 ** len(axes)
    if not left or passes >= spec.compile_from:
        return settings, None
    from trtseg.accel.engines import default_cache
    from trtseg.accel.fast_path import packages_ready

    cache_url = spec.cache or default_cache()
    if all(packages_ready(m, spec, spec.resolved_device(), cache_url) for m in model.models):
        return settings, None  # compiled packages from an earlier run: no start-up to earn back
    why = (f"{n_cases} case(s) x {2 ** len(axes)} mirroring(s) = {passes} passes, fewer than --compile-from "
           f"{spec.compile_from}: no {' or '.join(left)}, which cost more than they save on so few passes")
    return dataclasses.replace(settings, engine=spec.with_(off=spec.off | set(left))), why


def run_in_process(model: ModelSet, source, settings: Settings, cases: list[Case], todo: list[Case], results: dict,
                   output_url: str, storage_options, progress_bar: bool, t0: float, job: dict) -> dict:
    """Runs ``todo`` in this process (``results`` holds the skipped cases) and writes the run report; the start-up
    (engines built and warmed up, before the first case) is its own entry of the report's summary."""
    from trtseg.log import Progress, event
    from trtseg.pipeline import run_report, write_report

    settings, small = small_run_settings(model, settings, len(todo))
    if small:
        event("fast path: " + small)
        job = {**job, "small_run": small}
    # the first case is read (and on a GPU prepared) while the engines start, each next one while the GPU predicts
    reads = read_ahead(todo, model, settings, storage_options, settings.engine.resolved_device())
    try:
        t_setup = time.perf_counter()
        predictor = Predictor(model, settings)
        warm = 0.0
        if predictor.device.type == "cuda":  # compile and autotune before the first case, not inside it
            batch = max(settings.engine.batch_size, 1)
            for m, engines in zip(predictor.models.models, predictor.engines_per_pass):
                warm += sum(e.warm_up((batch, m.num_input_channels, *m.patch_size)) for e in engines)
        startup = {"before_engines": round(t_setup - t0, 3), "engines": round(time.perf_counter() - t_setup - warm, 3),
                   "warm_up": round(warm, 3)}
        event("run started", mode=job["mode"], cases=len(todo), skipped=len(results), engine=settings.engine.text(),
              startup_seconds=startup)
        progress = Progress(len(todo), progress_bar)

        def finished(r: CaseReport, case: Case) -> None:
            results[case.case_id] = r
            if r.status == "ok":
                event("case done", case=case.case_id, seconds=r.to_json()["seconds"])
            else:
                event("case failed", case=case.case_id, error=r.error)
            progress.update(cases=1, tiles=r.tiles or 0)

        # the write (gzip, storage) of one case runs in a thread while the GPU predicts the next: at most one case waits
        # to be written, so host memory holds at most two masks
        with ThreadPoolExecutor(1, thread_name_prefix="trtseg-write") as writer:
            pending: tuple[Future, Case] | None = None
            for case, (image, read_seconds, prepared) in zip(todo, reads):
                done = predictor.infer_case(case, storage_options, image, read_seconds, prepared)
                del prepared  # the volume is freed with the case, not held here while the next one is read
                if pending is not None:
                    finished(pending[0].result(), pending[1])
                    pending = None
                if isinstance(done, CaseReport):
                    finished(done, case)
                else:
                    pending = (writer.submit(predictor.write, done, output_url, storage_options), case)
            if pending is not None:
                finished(pending[0].result(), pending[1])
    finally:  # the reader thread stops even when the engines fail to build
        reads.close()
    progress.close()
    report = run_report(model, source, settings, predictor.engines[0].report() if predictor.engines else None,
                        cases, results, time.perf_counter() - t0, job={**job, "run_id": uuid.uuid4().hex[:6]},
                        startup=startup)
    write_report(output_url, report, storage_options)
    return report


def read_ahead(cases: list[Case], models: ModelSet, settings: Settings, storage_options=None,
               device: torch.device | None = None, prepare: bool | None = None) -> "ReadAhead":
    """An iterator of (image or None, read seconds, prepared or None) of each case in order, the next one made in a
    thread while the caller predicts this one. The first starts at the call, so it overlaps what the caller does
    before it iterates (building and warming up the engines).

    Reading: decompressing a 512x512x240 CT takes about half a second of CPU that the GPU would otherwise wait for.
    A case whose read fails yields None, and ``prepare_case`` reads it again to report its error.

    Preparing (``device`` a CUDA device): the thread also runs ``prepare_case``'s first pass (the host-to-GPU copy,
    preprocessing, padding) on its own CUDA stream, so that the GPU work beside the network (about 0.05 s a CT,
    and the Python that queues it) overlaps the previous case's inference instead of following it; prepared is
    that pass's (meta, padded volume on the device). On the CPU the stages share the same cores, so only the read
    runs ahead, unless ``prepare`` asks for it (the tests); ``TRTSEG_PREPARE_AHEAD=0`` turns it off on a GPU too,
    to time the two against each other on one machine."""
    from trtseg.pipeline import prepare_case, read_image

    on_gpu = device is not None and device.type == "cuda"
    if prepare is None:
        prepare = on_gpu and os.environ.get("TRTSEG_PREPARE_AHEAD", "1") != "0"
    ahead = device is not None and prepare
    streams: list = []  # the reader's one stream, made in its thread: the caching allocator reuses memory per stream

    def read(case: Case):
        if case.problem:
            return None, 0.0, None
        t = time.perf_counter()
        try:
            image = read_image(case, models, settings, storage_options)
        except Exception:
            return None, 0.0, None
        seconds = time.perf_counter() - t
        if not ahead:
            return image, seconds, None
        assert device is not None
        try:
            # no_grad, not inference_mode: the volume is used outside this thread's inference-mode scope later
            if on_gpu and not streams:
                streams.append(torch.cuda.Stream(device))
            with torch.no_grad(), torch.cuda.stream(streams[0]) if on_gpu else contextlib.nullcontext():
                meta, volume, _ = prepare_case(case, models, settings, device, storage_options, to_host=False,
                                               image=image)
        except Exception:
            return image, seconds, None
        if meta.get("error"):  # the caller prepares it again and reports the error: beside the running case, it may
            return image, seconds, None  # have been only the GPU memory that case held
        meta["seconds"]["read"] = seconds
        return image, seconds, (meta, volume)

    pool = ThreadPoolExecutor(1, thread_name_prefix="trtseg-read")
    first = pool.submit(read, cases[0]) if cases else None

    def results():
        pending = first
        for i in range(len(cases)):
            assert pending is not None
            result = pending.result()
            pending = pool.submit(read, cases[i + 1]) if i + 1 < len(cases) else None
            yield result
            result = None  # the image is the caller's now: not held here while the next one is read

    return ReadAhead(results(), pool)


class ReadAhead:
    """read_ahead's iterator; ``close`` stops its reader thread, whether or not the caller ever iterated (the
    engines' build can fail after the first read has started)."""

    def __init__(self, results, pool: ThreadPoolExecutor):
        self._results, self._pool = results, pool

    def __iter__(self):
        return self._results

    def close(self) -> None:
        self._results.close()
        self._pool.shutdown(wait=False, cancel_futures=True)


def dry_run_listing(todo: list[Case], skipped: dict, log=print) -> dict:
    """--dry-run: what a run would do, one line a case; the same on both paths."""
    for c in todo:
        log(f"would run {c.case_id}: {c.reason or 'new'} ({', '.join(c.files)})")
    for cid, r in skipped.items():
        log(f"would skip {cid}: {r.reason}")
    return {"dry_run": True, "cases": [c.case_id for c in todo], "skipped": sorted(skipped)}
