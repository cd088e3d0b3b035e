"""The job's driver: `trtseg predict` on Ray.

Ray: with ``address`` it joins that cluster; under `ray job submit` it joins the submitting cluster ($RAY_ADDRESS);
otherwise it starts a local Ray (the embedded default, also on CPU-only machines).

Flow per case: a prepare task (read + preprocess) -> the volume's tiles in chunks, spread over all inference
actors (least-loaded first) -> a reduce task (sum partials, export, write). Up to ``max_cases_in_flight`` cases
are between prepare and reduce at once, which bounds host and object-store memory while actors stay fed.
Actors restart after a crash and their pending calls are retried (Ray's max_restarts / max_task_retries);
tasks retry on worker failure (max_retries). Reruns skip cases whose mask was made by the same model and
settings (a stamp in the mask's header), unless ``overwrite``.
"""
from __future__ import annotations

import dataclasses
import enum
import math
import os
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

# imported before Ray starts, not lazily: once the job runs, Ray may unpack the job's working directory again at
# the same path for a node on the same host, and a module imported in that window is not found (the actor module,
# which imports Ray, is imported in run_job once the job is known to need Ray, still before Ray starts)
from trtseg.jobs.config import JobConfig
from trtseg.jobs.stages import prepare_task, write_task
from trtseg import storage
from trtseg.dataset import Case, list_cases
from trtseg.errors import one_line
from trtseg.ensemble import STAGE, ModelSet
from trtseg.model_folder import load_models
from trtseg.log import Progress, event as _event, setup_logging
from trtseg.pipeline import (CaseReport, check_cascade, run_report, select_cases, shard, with_postprocessing,
                             write_report)

def load_model(cfg: JobConfig) -> ModelSet:
    """The job's models: a card's, or those of the -m folders (trtseg/ensemble.py)."""
    if cfg.model_card:
        from trtseg.accel.card import model_from_card
        c = cfg.model_card
        return ModelSet.of(model_from_card(c["card"], c.get("network"), c.get("weights"), c.get("onnx"), cfg.folds))
    assert cfg.model, "a model folder or a model card is required"
    return load_models(cfg.model, cfg.folds, cfg.checkpoint)


def _init_ray(cfg: JobConfig, n_cpu_actors: int) -> bool:
    """Connects to (or starts) Ray; True when this call started a local Ray that the job must shut down."""
    import ray

    if ray.is_initialized():
        return False
    if cfg.address:
        ray.init(address=cfg.address, logging_level="WARNING", log_to_driver=False)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level="WARNING", log_to_driver=False)  # the cluster of `ray job submit`
    else:
        cpus = os.cpu_count() or 1
        ray.init(address="local", num_cpus=max(cpus, n_cpu_actors + 2), include_dashboard=False,
                 logging_level="WARNING", log_to_driver=False)
        return True
    return False


def _cause(e: BaseException) -> str:
    """One line for a failed Ray call: the exception raised inside the worker, not Ray's wrapper and traceback."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        e = cause
    return one_line(e, 300)


class _CaseRun:
    """A case between prepare and write: the pass (model) it is at, that pass's volume, where its tiles went, the
    stages' masks (object refs, for the cascades after them), and how often it was redone."""

    def __init__(self, case: Case):
        self.case, self.data = case, None
        self.index = 0  # the pass: a model of the run's ModelSet
        self.meta: dict = {}  # the first pass's meta: the case's header, shape and seconds (later passes add theirs)
        self.pass_meta: dict = {}  # the current pass's: its preprocessing and window plan
        self.prev: dict[int, object] = {}  # pass index -> object ref of that stage's mask
        self.tiles = 0
        self.volume_bytes = 0  # through the object store, over every pass
        self.finals: list[dict] = []
        self.attempt, self.open, self.owner = 0, 0, -1
        self.assigned: dict[int, int] = {}
        self.stats: list[dict] = []
        self.redone: list[str] = []
        self.mask = None  # object refs of the owner's mask and probabilities
        self.probabilities = None
        self.final: dict | None = None

    @property
    def key(self) -> str:
        """The case attempt: the owner's Combiner holds the passes' results under it."""
        return f"{self.case.case_id}#{self.attempt}"

    @property
    def pass_key(self) -> str:
        """The current pass of the attempt: the actors' sums and volumes are held under it."""
        return f"{self.key}/{self.index}"


def gpu_actor_count(n_gpus: float, gpus_per_actor: float, task_gpus: float) -> int:
    """Inference actors for a cluster with ``n_gpus`` GPUs: as many as fit while one GPU keeps ``task_gpus`` free for
    the prepare tasks, which cannot run at all otherwise (every case would wait for ever).

    Fractional actors pack within a GPU (Ray never splits one over two): with 0.2 GPU each and task_gpus 0.1, one
    GPU holds 4 actors, not 5. Actors of one or more GPUs take whole GPUs, and then a GPU share for the tasks costs
    one GPU's actors.
    """
    eps = 1e-9
    if gpus_per_actor <= 0:
        raise ValueError(f"gpus_per_actor must be positive, got {gpus_per_actor}")
    whole = math.floor(n_gpus + eps)
    if gpus_per_actor < 1:
        per_gpu = math.floor(1 / gpus_per_actor + eps)
        n = (whole - 1) * per_gpu + math.floor((1 - task_gpus) / gpus_per_actor + eps) if task_gpus > 0 else \
            whole * per_gpu
    else:
        n = math.floor((whole - (1 if task_gpus > 0 else 0)) / gpus_per_actor + eps)
    if n < 1:
        raise ValueError(f"--gpus-per-actor {gpus_per_actor:g} and --task-gpus {task_gpus:g} do not fit on "
                         f"{n_gpus:g} GPU(s): lower --gpus-per-actor (e.g. {max(0.1, 1 - task_gpus):g}) or set "
                         f"--task-gpus 0")
    return n


def _chunks(starts: list, n: int) -> list[list]:
    return [starts[i:i + n] for i in range(0, len(starts), n)]


def run_job(cfg: JobConfig) -> dict:
    """Runs the job described by ``cfg``; returns the run report (also written to OUTPUT/run_report.json). Ray is
    imported only once the job needs it: a run in one process spares its import (about a second)."""

    setup_logging(cfg.log_json)
    storage.set_default_options(cfg.storage_options)
    t_start = time.perf_counter()
    cfg = dataclasses.replace(cfg, settings=cfg.settings.for_input(cfg.input))
    if not cfg.dry_run:
        storage.check_writable(cfg.output)
        removed = storage.remove_stale_parts(cfg.output)  # temporary files of a run that was killed
        if removed:
            _event("removed temporary files of an interrupted run", count=removed)
    model = with_postprocessing(load_model(cfg), cfg.settings)
    check_cascade(model, cfg.settings)
    cases = shard(list_cases(cfg.input, model.num_image_channels, allow_empty=cfg.allow_empty), cfg.shard)
    if cfg.limit is not None:
        cases = cases[: cfg.limit]
    todo, results = select_cases(cases, cfg.output, model, cfg.settings, cfg.overwrite, None, cfg.input_identity)
    if cfg.dry_run:
        from trtseg.predict import dry_run_listing
        return dry_run_listing(todo, results)
    if _in_one_process(cfg, len(todo)):
        from trtseg.predict import run_in_process
        why = ("no cluster to join and at most one GPU" if cfg.ray_from_cases is None else
               f"fewer than {cfg.ray_from_cases} cases, no cluster to join, at most one GPU") + \
            " (--ray-from-cases N: Ray from N cases)"
        _event(f"running in this process, without Ray: {why}", cases=len(todo))
        return run_in_process(model, cfg.model or (cfg.model_card or {}).get("card"), cfg.settings, cases, todo,
                              results, cfg.output, None, cfg.progress, t_start,
                              {"mode": "single-process", "chosen": why, "shard": cfg.shard})

    import ray

    import trtseg.jobs.actor  # noqa: F401  before Ray starts: see the note on the imports at the top

    cpu_mode = bool(cfg.cpu_actors) or cfg.settings.engine.device == "cpu"
    t_ray = time.perf_counter()
    started_ray = _init_ray(cfg, cfg.cpu_actors or 1)
    startup = {"before_ray": round(t_ray - t_start, 3), "ray_start": round(time.perf_counter() - t_ray, 3)}
    try:
        return _run(cfg, model, cases, todo, results, cpu_mode, t_start, startup)
    finally:
        if started_ray:
            ray.shutdown()


class Event(enum.Enum):
    """What a finished Ray call means for its case."""

    PREPARED = "prepared"    # prepare_task: the volume is in the object store (or the case failed / is empty)
    INFERRED = "inferred"    # an actor's infer_chunk: a chunk of tiles is summed
    FINALIZED = "finalized"  # the owner's finalize: the mask is in the object store
    WRITTEN = "written"      # write_task: the mask (and probabilities) are committed


@dataclass
class _Waiting:
    """A pending Ray call: its case, what its end means, the case attempt it belongs to, and for a chunk the actor
    index and tile count."""

    case_id: str
    event: Event
    attempt: int
    chunk: tuple[int, int] | None = None


class Scheduler:
    """Runs the cases of a job on a connected Ray: one method per event of a case (prepared, inferred, finalized,
    written, failed), driven by ``run``'s loop over ``ray.wait``.

    Up to ``max_cases_in_flight`` cases hold a volume at once (prepare -> finalize); each case's tiles are spread
    over the live actors, least-loaded first, and the least-loaded owns the case; a case whose sums an actor lost
    is redone on live actors at most ``case_retries`` times."""

    def __init__(self, cfg: JobConfig, model: ModelSet, todo: list[Case], results: dict, cpu_mode: bool,
                 t_start: float):
        import ray

        self.cfg, self.t_start, self.results = cfg, t_start, results
        n_gpus = float(ray.cluster_resources().get("GPU", 0)) if not cpu_mode else 0.0
        self.cpu_mode = cpu_mode or n_gpus == 0
        self.n_actors = (cfg.cpu_actors or 1) if self.cpu_mode else \
            gpu_actor_count(n_gpus, cfg.gpus_per_actor, cfg.task_gpus)
        self.run_id = uuid.uuid4().hex[:6]
        self.settings = dataclasses.replace(cfg.settings, engine=cfg.settings.engine.with_(
            device="cpu" if self.cpu_mode else cfg.settings.engine.device))
        self.models = model
        self.light_ref = ray.put(model.without_weights())
        # held for the whole run: Ray re-sends it when it restarts an actor (a dropped ref would be freed)
        self.model_ref = ray.put(model)
        threads = max(1, (os.cpu_count() or 1) // self.n_actors) if self.cpu_mode else None
        from trtseg.jobs.actor import CONCURRENCY_GROUPS, InferenceActor  # imported by run_job before Ray started

        actor_cls = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(InferenceActor)
        # SPREAD: actors go to different nodes where they fit, so a multi-node cluster's GPUs (and the network links
        # and CPUs beside them) all work; actor_resources pins them to nodes with a custom resource (a GPU type)
        self.actors = [actor_cls.options(
            name=f"trtseg-infer-{self.run_id}-{i}", num_cpus=1, num_gpus=0 if self.cpu_mode else cfg.gpus_per_actor,
            resources=cfg.actor_resources or None, scheduling_strategy="SPREAD", max_restarts=cfg.actor_restarts,
            max_task_retries=cfg.task_retries).remote(self.model_ref, self.settings, f"infer-{i}", threads,
                                                      cfg.storage_options, cfg.diagnostics)
            for i in range(self.n_actors)]
        for a in self.actors:  # compile and autotune on each actor's tile thread while the first volumes are read
            a.warm_up.remote()
        task_opts = {"num_cpus": 1, "num_gpus": 0 if self.cpu_mode else cfg.task_gpus, "max_retries": cfg.task_retries}
        prepare_fn, write_fn = ray.remote(prepare_task), ray.remote(write_task)  # exported once, named per case
        self._prepare = lambda cid: prepare_fn.options(name=f"prepare:{cid}", num_returns=2, **task_opts)
        self._write = lambda cid: write_fn.options(name=f"write:{cid}", num_cpus=1, max_retries=cfg.task_retries)
        self.progress = Progress(len(todo), cfg.progress)
        self.load: dict[int, int] = defaultdict(int)  # tiles queued per actor index
        self.dead: set[int] = set()  # actors that died past their restarts
        self.pending = list(todo)
        self.runs: dict[str, _CaseRun] = {}
        self.waiting: dict = {}  # object ref -> _Waiting
        _event("job started", run_id=self.run_id, cases=len(todo), skipped=len(results), actors=self.n_actors,
               mode=self.mode, engine=self.settings.engine.text())

    @property
    def mode(self) -> str:
        return "cpu" if self.cpu_mode else "gpu"

    def run(self) -> list[dict]:
        """Schedules every case to its end; returns the actors' counters."""
        import ray

        while self.pending or self.runs:
            self._admit()
            ready, _ = ray.wait(list(self.waiting), num_returns=1, timeout=5.0)
            for ref in ready:
                w = self.waiting.pop(ref)
                run = self.runs.get(w.case_id)
                if run is None or w.attempt != run.attempt:
                    continue  # a stale answer of an abandoned attempt
                try:
                    value = ray.get(ref)
                except Exception as e:
                    self.on_error(run, w, e)
                    continue
                getattr(self, f"on_{w.event.value}")(run, value, w)
        self.progress.close()
        return ray.get([a.stats.remote() for a in self.actors])

    def _admit(self) -> None:
        """Starts prepare tasks while fewer than max_cases_in_flight cases hold a volume (prepare -> finalize; a
        case being written holds just its mask)."""
        while self.pending and sum(r.final is None for r in self.runs.values()) < self.cfg.max_cases_in_flight:
            case = self.pending.pop(0)
            self.runs[case.case_id] = run = _CaseRun(case)
            self._prepare_pass(run)

    def _prepare_pass(self, run: "_CaseRun") -> None:
        """The prepare task of the run's current pass; a cascade's pass gets its stage's mask (an object ref)."""
        prev = self.models.previous[run.index]
        meta_ref, run.data = self._prepare(run.case.case_id).remote(
            run.case, self.light_ref, self.settings, self.cfg.storage_options, run.index,
            run.prev.get(prev) if prev is not None else None)
        self.waiting[meta_ref] = _Waiting(run.case.case_id, Event.PREPARED, run.attempt)

    def on_error(self, run: "_CaseRun", w: _Waiting, e: BaseException) -> None:
        import ray

        error = storage.redact(f"{run.case.files[0]}: {_cause(e)}")
        if isinstance(e, ray.exceptions.ActorDiedError) and w.chunk is not None:
            self.dead.add(w.chunk[0])
        if w.event in (Event.INFERRED, Event.FINALIZED):
            self.redo_or_fail(run, error)
        else:
            self.on_failed(run.case.case_id, error)

    def on_prepared(self, run: "_CaseRun", meta: dict, w: _Waiting) -> None:
        if run.index == 0:
            run.meta = meta
        else:
            for k, v in meta.get("seconds", {}).items():
                run.meta["seconds"][k] = run.meta["seconds"].get(k, 0.0) + v
        run.pass_meta = meta
        run.volume_bytes += meta.get("volume_bytes", 0)
        if meta.get("error"):
            self.on_failed(run.case.case_id, meta["error"], run.meta.get("seconds"))
        elif meta.get("empty"):
            self._write_case(run, None, None)
        else:
            self.distribute(run)

    def on_inferred(self, run: "_CaseRun", stats: dict, w: _Waiting) -> None:
        assert w.chunk is not None
        i, n = w.chunk
        self.load[i] -= n
        run.stats.append(stats)
        run.open -= 1
        self.progress.update(tiles=n)
        if run.open == 0:
            self.finalize(run)

    def on_finalized(self, run: "_CaseRun", final: dict, w: _Waiting) -> None:
        run.finals.append(final)
        run.data = None  # the volume may leave the object store
        if final.get("more"):  # the next model's pass; a stage's mask goes to its prepare task
            if self.models.roles[run.index] == STAGE:
                run.prev[run.index] = run.mask
            run.index += 1
            self._prepare_pass(run)
            return
        run.final = final
        self._write_case(run, run.mask, run.probabilities)

    def on_written(self, run: "_CaseRun", value: dict, w: _Waiting) -> None:
        cid, meta = run.case.case_id, run.meta
        if value.get("error"):
            self.on_failed(cid, value["error"], {**meta.get("seconds", {}), **value.get("seconds", {})})
            return
        self.results[cid] = self._case_report(run, value)
        _event("case done", case=cid, seconds=self.results[cid].to_json()["seconds"],
               actors=self.results[cid].actors)
        self.runs.pop(cid)
        self.progress.update(cases=1)

    def on_failed(self, cid: str, error: str, seconds=None) -> None:
        self.results[cid] = CaseReport(cid, "failed", error=error, seconds=seconds or {})
        _event("case failed", case=cid, error=error)
        self.runs.pop(cid, None)
        self.progress.update(cases=1)

    def _write_case(self, run: "_CaseRun", mask_ref, probabilities_ref) -> None:
        ref = self._write(run.case.case_id).remote(run.meta, self.light_ref, self.settings, self.cfg.output,
                                                   self.cfg.storage_options, mask_ref, probabilities_ref)
        self.waiting[ref] = _Waiting(run.case.case_id, Event.WRITTEN, run.attempt)

    def distribute(self, run: "_CaseRun") -> None:
        """Sends a case's tiles to the live actors in chunks; the least-loaded actor owns the case."""
        live = [i for i in range(self.n_actors) if i not in self.dead]
        if not live:
            raise RuntimeError("no inference actor is alive")
        plan = run.pass_meta["plan"]
        size = max(1, min(self.cfg.tiles_per_task, math.ceil(len(plan.starts) / len(live))))
        if run.index == 0:  # the owner of the first pass owns every pass: it holds the case's Combiner
            run.owner = min(live, key=lambda k: self.load[k])
        run.tiles += len(plan.starts)
        run.assigned = defaultdict(int)
        for n, chunk in enumerate(_chunks(plan.starts, size)):
            i = run.owner if n == 0 else min(live, key=lambda k: self.load[k])
            if i not in run.assigned:  # the volume goes to the actor's device while it works on earlier cases
                self.actors[i].prefetch.remote(run.pass_key, run.data)
            self.load[i] += len(chunk)
            ref = self.actors[i].infer_chunk.remote(run.pass_key, run.data, plan, chunk, run.assigned[i], run.index)
            run.assigned[i] += len(chunk)
            run.open += 1
            self.waiting[ref] = _Waiting(run.case.case_id, Event.INFERRED, run.attempt, (i, len(chunk)))

    def finalize(self, run: "_CaseRun") -> None:
        """The helpers hand their partial sums to the owner, which exports the mask on its device."""
        partials = [self.actors[i].take_partial.remote(run.pass_key, n, self.cfg.partials)
                    for i, n in run.assigned.items() if i != run.owner]
        stats_ref, run.mask, run.probabilities = self.actors[run.owner].finalize.options(num_returns=3).remote(
            run.pass_key, run.assigned[run.owner], run.pass_meta, *partials)
        self.waiting[stats_ref] = _Waiting(run.case.case_id, Event.FINALIZED, run.attempt)

    def redo_or_fail(self, run: "_CaseRun", error: str) -> None:
        """A case whose summed tiles were lost (an actor restarted or died) is redone, a bounded number of times: its
        pass again, or with several passes the case from its first (the owner's Combiner may be lost with it)."""
        for i in {*run.assigned, run.owner}:
            self.actors[i].drop.remote(run.key)
        for i in run.assigned:
            self.load[i] = max(0, self.load[i] - run.assigned[i])
        if run.attempt >= self.cfg.case_retries:
            self.on_failed(run.case.case_id, error)
            return
        run.attempt += 1
        run.redone.append(error)
        run.open = 0
        run.stats, run.finals, run.tiles, run.volume_bytes = [], [], 0, 0
        _event("case redone", case=run.case.case_id, attempt=run.attempt, cause=error)
        if len(self.models.models) == 1:
            self.distribute(run)  # its volume is still in the object store
        else:
            run.index, run.prev = 0, {}
            self._prepare_pass(run)

    def _case_report(self, run: "_CaseRun", written: dict) -> CaseReport:
        meta, final = run.meta, run.final or {}
        finals = run.finals or [final]
        per_actor: dict[str, int] = defaultdict(int)
        for st in run.stats:
            per_actor[st["actor"]] += st["tiles"]
        seconds = {**meta.get("seconds", {}), "infer": sum(st["seconds"] for st in run.stats),
                   "export": sum(f.get("export_seconds", 0.0) for f in finals), **written["seconds"]}
        return CaseReport(
            run.case.case_id, "ok", output=written["output"], seconds=seconds, reason=run.case.reason,
            tiles=run.tiles, actors=dict(per_actor), owner=final.get("owner"),
            redone=run.redone,
            object_store_bytes={"volume": run.volume_bytes, "partials": sum(f.get("partial_bytes", 0) for f in finals),
                                "mask": int(np.prod(meta.get("shape_zyx", (0,)))),
                                "probabilities": final.get("probability_bytes", 0)},
            peak_rss_mb={"prepare_worker": meta.get("peak_rss_mb"), "write_worker": written.get("peak_rss_mb")},
            peak_gpu_memory_mb=final.get("peak_gpu_memory_mb"), done_at_s=round(time.perf_counter() - self.t_start, 3),
            postprocessing=written.get("postprocessing"))

    def report(self, model: ModelSet, cases: list[Case], actor_stats: list[dict]) -> dict:
        by_name = {a["actor"]: a for a in actor_stats}
        for r in self.results.values():  # which engine and GPU made each mask
            names = list(r.actors or {})
            if names:
                r.engine = by_name.get(names[0], {}).get("engine")
                r.gpus = sorted({str(by_name.get(n, {}).get("gpu")) for n in names})
        cfg = self.cfg
        job = {"run_id": self.run_id, "mode": self.mode, "shard": cfg.shard, "actors": self.n_actors,
               "partials": cfg.partials,
               "tiles_per_task": cfg.tiles_per_task, "max_cases_in_flight": cfg.max_cases_in_flight,
               "ray_address": cfg.address or os.environ.get("RAY_ADDRESS") or "local"}
        return run_report(model, cfg.model or (cfg.model_card or {}).get("card"), self.settings,
                          actor_stats[0]["engine"] if actor_stats else None, cases, self.results,
                          time.perf_counter() - self.t_start, job=job, actors=actor_stats)


def _in_one_process(cfg: JobConfig, n_cases: int) -> bool:
    """Whether one process beats starting Ray: no cluster to join, no CPU actors asked for, at most one GPU, and
    fewer cases than --ray-from-cases if it is given. One engine on one GPU gains nothing from Ray that the single
    process's read-ahead does not give (trtseg.predict.read_ahead), and Ray's start-up, actor start and
    object-store copies cost seconds (benchmarks/predict_vs_nnunet.py measures both)."""
    import sys

    import torch

    if cfg.cpu_actors or (cfg.ray_from_cases is not None and (cfg.ray_from_cases <= 0 or
                                                              n_cases >= cfg.ray_from_cases)):
        return False
    if cfg.address or os.environ.get("RAY_ADDRESS") or ("ray" in sys.modules and sys.modules["ray"].is_initialized()):
        return False
    return torch.cuda.device_count() <= 1


def _run(cfg: JobConfig, model: ModelSet, cases: list[Case], todo: list[Case], results: dict, cpu_mode: bool,
         t_start: float, startup: dict | None = None) -> dict:
    """Schedules the cases of ``todo`` on a connected Ray; ``results`` already holds the skipped ones."""
    import ray

    t_actors = time.perf_counter()
    epoch_start = time.time() - (t_actors - t_start)
    scheduler = Scheduler(cfg, model, todo, results, cpu_mode, t_start)
    actor_stats = scheduler.run()
    report = scheduler.report(model, cases, actor_stats)
    firsts = [a["first_tile_at"] for a in actor_stats if a.get("first_tile_at")]
    report["summary"]["startup_seconds"] = {
        **(startup or {}), "actors_warm_up": max((a["warmup_seconds"] for a in actor_stats), default=0.0),
        "to_first_tile": round(min(firsts) - epoch_start, 3) if firsts else None}
    for a in scheduler.actors:
        ray.kill(a)
    write_report(cfg.output, report)
    _event("job finished", **report["summary"])
    return report
