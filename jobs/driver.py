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
import json
import logging
import math
import os
import sys
import time
import uuid
from collections import defaultdict

import numpy as np

from jobs.config import JobConfig
from trtseg import storage
from trtseg.dataset import Case, list_cases
from trtseg.errors import one_line
from trtseg.model import NnUNetModel, load_model_folder
from trtseg.pipeline import CaseReport, run_report, select_cases, write_report

log = logging.getLogger("trtseg.job")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname, "msg": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        return json.dumps(entry)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in getattr(record, "fields", {}).items())
        return f"{self.formatTime(record, '%H:%M:%S')} {record.getMessage()} {fields}".rstrip()


def _setup_logging(as_json: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if as_json else _TextFormatter())
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False


def _event(msg: str, **fields) -> None:
    log.info(msg, extra={"fields": fields})


class Progress:
    """cases done/total, tiles/s and ETA on one line (a terminal) or one line per case (a log)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.tiles, self.t0 = total, 0, 0, time.perf_counter()
        self.enabled, self.tty = enabled, sys.stderr.isatty()

    def update(self, cases: int = 0, tiles: int = 0) -> None:
        self.done += cases
        self.tiles += tiles
        if not self.enabled or (not cases and not self.tty):
            return
        el = time.perf_counter() - self.t0
        rate = self.done / el if el > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        line = (f"[{self.done}/{self.total} cases] {self.tiles / max(el, 1e-9):.1f} tiles/s, "
                f"elapsed {el:.0f}s, ETA {eta:.0f}s")
        sys.stderr.write(("\r" + line) if self.tty else line + "\n")
        sys.stderr.flush()


def load_model(cfg: JobConfig) -> NnUNetModel:
    if cfg.model_card:
        from accel.card import model_from_card
        c = cfg.model_card
        return model_from_card(c["card"], c.get("network"), c.get("weights"), c.get("onnx"))
    assert cfg.model, "a model folder or a model card is required"
    return load_model_folder(cfg.model, cfg.folds, cfg.checkpoint)


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
    """A case between prepare and write: its volume, where its tiles went, and how often it was redone."""

    def __init__(self, case: Case, data_ref):
        self.case, self.data = case, data_ref
        self.meta: dict = {}
        self.attempt, self.open, self.owner = 0, 0, -1
        self.assigned: dict[int, int] = {}
        self.stats: list[dict] = []
        self.redone: list[str] = []
        self.mask = None  # object refs of the owner's mask and probabilities
        self.probabilities = None
        self.final: dict | None = None

    @property
    def key(self) -> str:
        return f"{self.case.case_id}#{self.attempt}"


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
    """Runs the job described by ``cfg``; returns the run report (also written to OUTPUT/run_report.json)."""
    import ray

    _setup_logging(cfg.log_json)
    storage.set_default_options(cfg.storage_options)
    t_start = time.perf_counter()
    if not cfg.dry_run:
        storage.check_writable(cfg.output)
        removed = storage.remove_stale_parts(cfg.output)  # temporary files of a run that was killed
        if removed:
            _event("removed temporary files of an interrupted run", count=removed)
    model = load_model(cfg)
    cases = list_cases(cfg.input, model.num_input_channels)
    if cfg.limit is not None:
        cases = cases[: cfg.limit]
    todo, results = select_cases(cases, cfg.output, model, cfg.settings, cfg.overwrite)
    if cfg.dry_run:
        from trtseg.predict import dry_run_listing
        return dry_run_listing(todo, results)

    cpu_mode = bool(cfg.cpu_actors) or cfg.settings.engine.device == "cpu"
    started_ray = _init_ray(cfg, cfg.cpu_actors or 1)
    try:
        return _run(cfg, model, cases, todo, results, cpu_mode, t_start)
    finally:
        if started_ray:
            ray.shutdown()


def _run(cfg: JobConfig, model: NnUNetModel, cases: list[Case], todo: list[Case], results: dict, cpu_mode: bool,
         t_start: float) -> dict:
    """Schedules the cases of ``todo`` on a connected Ray; ``results`` already holds the skipped ones."""
    import ray

    from jobs.actor import CONCURRENCY_GROUPS, InferenceActor
    from jobs.stages import prepare_task, write_task

    n_gpus = float(ray.cluster_resources().get("GPU", 0)) if not cpu_mode else 0.0
    if n_gpus == 0:
        cpu_mode = True
    n_actors = (cfg.cpu_actors or 1) if cpu_mode else gpu_actor_count(n_gpus, cfg.gpus_per_actor, cfg.task_gpus)
    run_id = uuid.uuid4().hex[:6]
    settings = dataclasses.replace(cfg.settings, engine=cfg.settings.engine.with_(
        device="cpu" if cpu_mode else cfg.settings.engine.device))
    model_ref = ray.put(model)
    light = model.without_weights()
    light_ref = ray.put(light)
    threads = max(1, (os.cpu_count() or 1) // n_actors) if cpu_mode else None
    actor_cls = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(InferenceActor)
    # SPREAD: actors go to different nodes where they fit, so a multi-node cluster's GPUs (and the network links
    # and CPUs beside them) all work; actor_resources pins them to nodes with a custom resource (a GPU type)
    actors = [actor_cls.options(name=f"trtseg-infer-{run_id}-{i}", num_cpus=1, num_gpus=0 if cpu_mode else cfg.gpus_per_actor,
                                resources=cfg.actor_resources or None, scheduling_strategy="SPREAD",
                                max_restarts=cfg.actor_restarts, max_task_retries=cfg.task_retries)
              .remote(model_ref, settings, f"infer-{i}", threads, cfg.storage_options, cfg.diagnostics)
              for i in range(n_actors)]
    for a in actors:  # compile and autotune on each actor's tile thread while the first volumes are read
        a.warm_up.remote()
    task_gpus = 0 if cpu_mode else cfg.task_gpus
    task_opts = {"num_cpus": 1, "num_gpus": task_gpus, "max_retries": cfg.task_retries}
    prepare_fn, write_fn = ray.remote(prepare_task), ray.remote(write_task)

    def prepare(cid: str):
        return prepare_fn.options(name=f"prepare:{cid}", num_returns=2, **task_opts)

    def write(cid: str):
        return write_fn.options(name=f"write:{cid}", num_cpus=1, max_retries=cfg.task_retries)
    _event("job started", run_id=run_id, cases=len(todo), skipped=len(results), actors=n_actors,
           mode="cpu" if cpu_mode else "gpu", engine=settings.engine.text())

    progress = Progress(len(todo), cfg.progress)
    load = defaultdict(int)  # tiles queued per actor index
    dead: set[int] = set()  # actors that died past their restarts
    pending = list(todo)
    runs: dict[str, _CaseRun] = {}
    waiting: dict = {}  # object ref -> (case id, kind, attempt, extra)

    def fail(cid: str, error: str, seconds=None) -> None:
        results[cid] = CaseReport(cid, "failed", error=error, seconds=seconds or {})
        _event("case failed", case=cid, error=error)
        runs.pop(cid, None)
        progress.update(cases=1)

    def distribute(run: "_CaseRun") -> None:
        """Sends a case's tiles to the live actors in chunks; the least-loaded actor owns the case."""
        live = [i for i in range(n_actors) if i not in dead]
        if not live:
            raise RuntimeError("no inference actor is alive")
        plan = run.meta["plan"]
        starts = plan.starts
        size = max(1, min(cfg.tiles_per_task, math.ceil(len(starts) / len(live))))
        run.owner = min(live, key=lambda k: load[k])
        run.assigned = defaultdict(int)
        for n, chunk in enumerate(_chunks(starts, size)):
            i = run.owner if n == 0 else min(live, key=lambda k: load[k])
            if i not in run.assigned:  # the volume goes to the actor's device while it works on earlier cases
                actors[i].prefetch.remote(run.key, run.data)
            load[i] += len(chunk)
            ref = actors[i].infer_chunk.remote(run.key, run.data, plan, chunk, run.assigned[i])
            run.assigned[i] += len(chunk)
            run.open += 1
            waiting[ref] = (run.case.case_id, "inferred", run.attempt, (i, len(chunk)))

    def finalize(run: "_CaseRun") -> None:
        partials = [actors[i].take_partial.remote(run.key, n, cfg.partials)
                    for i, n in run.assigned.items() if i != run.owner]
        stats_ref, run.mask, run.probabilities = actors[run.owner].finalize.options(num_returns=3).remote(
            run.key, run.assigned[run.owner], run.meta, light_ref, *partials)
        waiting[stats_ref] = (run.case.case_id, "finalized", run.attempt, None)

    def redo_or_fail(run: "_CaseRun", error: str) -> None:
        """A case whose summed tiles were lost (an actor restarted or died) is redone, a bounded number of times."""
        for i in run.assigned:
            actors[i].drop.remote(run.key)
            load[i] = max(0, load[i] - run.assigned[i])
        if run.attempt >= cfg.case_retries:
            fail(run.case.case_id, error)
            return
        run.attempt += 1
        run.redone.append(error)
        run.open = 0
        run.stats = []
        _event("case redone", case=run.case.case_id, attempt=run.attempt, cause=error)
        distribute(run)

    while pending or runs:
        # only cases that hold a volume count (prepare -> finalize); a case being written holds just its mask
        while pending and sum(r.final is None for r in runs.values()) < cfg.max_cases_in_flight:
            case = pending.pop(0)
            meta_ref, data_ref = prepare(case.case_id).remote(case, light_ref, settings, cfg.storage_options)
            runs[case.case_id] = _CaseRun(case, data_ref)
            waiting[meta_ref] = (case.case_id, "prepared", 0, None)
        ready, _ = ray.wait(list(waiting), num_returns=1, timeout=5.0)
        for ref in ready:
            cid, kind, attempt, extra = waiting.pop(ref)
            run = runs.get(cid)
            if run is None or attempt != run.attempt:
                continue  # a stale answer of an abandoned attempt
            try:
                value = ray.get(ref)
            except Exception as e:
                error = storage.redact(f"{run.case.files[0]}: {_cause(e)}")
                if isinstance(e, ray.exceptions.ActorDiedError) and extra is not None:
                    dead.add(extra[0])
                if kind in ("inferred", "finalized"):
                    redo_or_fail(run, error)
                else:
                    fail(cid, error)
                continue
            if kind == "prepared":
                run.meta = value
                if value.get("error"):
                    fail(cid, value["error"], value.get("seconds"))
                elif value.get("empty"):
                    waiting[write(cid).remote(value, light_ref, settings, cfg.output, cfg.storage_options, None)] = \
                        (cid, "written", run.attempt, None)
                else:
                    distribute(run)
            elif kind == "inferred":
                i, n = extra
                load[i] -= n
                run.stats.append(value)
                run.open -= 1
                progress.update(tiles=n)
                if run.open == 0:
                    finalize(run)
            elif kind == "finalized":
                run.final = value
                run.data = None  # the volume may leave the object store
                waiting[write(cid).remote(run.meta, light_ref, settings, cfg.output, cfg.storage_options, run.mask,
                                          run.probabilities)] = \
                    (cid, "written", run.attempt, None)
            elif kind == "written":
                meta = run.meta
                if value.get("error"):
                    fail(cid, value["error"], {**meta.get("seconds", {}), **value.get("seconds", {})})
                    continue
                per_actor: dict[str, int] = defaultdict(int)
                for s in run.stats:
                    per_actor[s["actor"]] += s["tiles"]
                final = run.final or {}
                seconds = {**meta.get("seconds", {}), "infer": sum(s["seconds"] for s in run.stats),
                           "export": final.get("export_seconds", 0.0), **value["seconds"]}
                results[cid] = CaseReport(
                    cid, "ok", output=value["output"], seconds=seconds, tiles=len(meta["plan"].starts) if "plan" in meta else 0,
                    actors=dict(per_actor), owner=final.get("owner"), redone=run.redone,
                    object_store_bytes={"volume": meta.get("volume_bytes", 0),
                                        "partials": final.get("partial_bytes", 0),
                                        "mask": int(np.prod(meta.get("shape_zyx", (0,)))),
                                        "probabilities": final.get("probability_bytes", 0)},
                    peak_rss_mb={"prepare_worker": meta.get("peak_rss_mb"), "write_worker": value.get("peak_rss_mb")},
                    peak_gpu_memory_mb=final.get("peak_gpu_memory_mb"),
                    done_at_s=round(time.perf_counter() - t_start, 3))
                _event("case done", case=cid, seconds=results[cid].to_json()["seconds"], actors=dict(per_actor))
                runs.pop(cid)
                progress.update(cases=1)
    if cfg.progress and progress.tty:
        sys.stderr.write("\n")
    actor_stats = ray.get([a.stats.remote() for a in actors])
    by_name = {a["actor"]: a for a in actor_stats}
    for r in results.values():  # which engine and GPU made each mask
        names = list(r.actors or {})
        if names:
            r.engine = by_name.get(names[0], {}).get("engine")
            r.gpus = sorted({str(by_name.get(n, {}).get("gpu")) for n in names})
    job = {"run_id": run_id, "mode": "cpu" if cpu_mode else "gpu", "actors": n_actors, "partials": cfg.partials,
           "tiles_per_task": cfg.tiles_per_task, "max_cases_in_flight": cfg.max_cases_in_flight,
           "ray_address": cfg.address or os.environ.get("RAY_ADDRESS") or "local"}
    report = run_report(model, cfg.model or (cfg.model_card or {}).get("card"), settings,
                        actor_stats[0]["engine"] if actor_stats else None, cases, results,
                        time.perf_counter() - t_start, job=job, actors=actor_stats)
    for a in actors:
        ray.kill(a)
    write_report(cfg.output, report)
    _event("job finished", **report["summary"])
    return report
