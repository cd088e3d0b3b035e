"""The case stages every path runs: which cases to do, prepare (read -> preprocess -> window plan), write, and the
run report. ``trtseg.predict`` runs them in one process; the Ray job (trtseg/jobs/) runs the same functions as tasks and
its actors run the sliding window (``trtseg.infer.run_tiles`` into a ``trtseg.aggregate.Merger``) between them.

A mask carries a stamp of what made it (model fingerprint, folds, the settings that change masks, postprocessing),
and its ledger entry (trtseg/ledger.py) records that stamp with the input's identity: a rerun redoes what changed
and skips the rest, unless ``overwrite``. Both paths write the same report.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from trtseg import ledger, postprocess, storage, transfer
from trtseg.dataset import Case
from trtseg.ensemble import ModelSet
from trtseg.errors import CaseError, TrtsegError, one_line
from trtseg.export import empty_export
from trtseg.model import NnUNetModel
from trtseg.options import Settings
from trtseg.preprocess import preprocess
from trtseg.read import CaseImage, read_case
from trtseg.window import plan_window
from trtseg.write import write_mask, write_probabilities


def stamp(model, settings: Settings) -> str:
    """What made a mask: the model fingerprint, its folds, the settings that change masks and its postprocessing."""
    w = settings.window
    pp = model.postprocessing
    pp_tag = hashlib.sha256(json.dumps(pp.describe()["steps"]).encode()).hexdigest()[:8] if pp.steps else "none"
    acc = " acc=fp16" if w.accumulate == "fp16" else ""  # fp32, the default, leaves earlier stamps as they were
    rules = settings.input.given()  # which series of a study folder: another rule may pick another series
    series = f" series={json.dumps(rules, sort_keys=True)}" if rules else ""
    return (f"{model.fingerprint} folds={','.join(model.folds)} step={w.step_size} tta={int(w.use_mirroring)} "
            f"pp={pp_tag}{acc}{series}")


def check_cascade(models: ModelSet, settings: Settings) -> None:
    """A cascade model runs only with its previous stage: a 3d_lowres folder in the same -m list, or its masks from
    --prev-stage-predictions; one error naming the model folder otherwise."""
    file_stages = [i for i in range(len(models.models)) if models.file_stage(i)]
    for i in file_stages:
        m = models.models[i]
        if not settings.prev_stage_predictions:
            raise TrtsegError(f"{m.folder}: a {m.configuration_name} model takes its {m.previous_stage} stage's "
                              f"masks as input: add the {m.previous_stage} model folder to -m (both stages in one "
                              "job), or give its masks with --prev-stage-predictions FOLDER (nnU-Net's "
                              "-prev_stage_predictions)")
    if settings.prev_stage_predictions and not file_stages:
        raise TrtsegError(f"{models.folder}: --prev-stage-predictions given, but no model of this run takes them "
                          "(no cascade configuration, or its previous stage is in -m)")


def read_prev_stage(case: Case, model, settings: Settings, shape_zyx, storage_options=None) -> np.ndarray:
    """The case's previous-stage mask (z, y, x): FOLDER/CASE with dataset.json's file_ending (as nnU-Net names it),
    else with the case's own ending; it must lie on the image's grid."""
    from trtseg.read import read_channel

    folder = settings.prev_stage_predictions
    assert folder
    names = [case.case_id + e for e in dict.fromkeys((model.dataset_json.get("file_ending", ".nii.gz"), case.ending))]
    urls = [storage.join(folder, n) for n in names]
    url = next((u for u in urls if storage.exists(u, storage_options)), None)
    if url is None:
        raise CaseError(urls[0], f"no previous-stage mask for case {case.case_id} (the {model.previous_stage} "
                                 f"stage's output) in {folder}")
    arr, _, _, _ = read_channel(url, storage_options)
    if tuple(arr.shape[1:]) != tuple(shape_zyx):
        raise CaseError(url, f"previous-stage mask of shape {arr.shape[1:][::-1]} does not lie on the image's grid "
                             f"{tuple(shape_zyx)[::-1]} (x, y, z)")
    return arr[0].astype(np.int32)


def with_postprocessing(models: "ModelSet | NnUNetModel", settings: Settings, storage_options=None) -> ModelSet:
    """The run's models with the postprocessing it applies to the final masks: none with
    --disable-postprocessing, the file of --postprocessing (its labels checked against the models'), else a lone
    model folder's own (v1's postprocessing.json)."""
    models = ModelSet.of(models)
    out = settings.output
    if out.disable_postprocessing:
        return models.with_postprocessing(postprocess.NONE)
    if out.postprocessing:
        pp = postprocess.load(out.postprocessing, storage_options)
        pp.check_labels(set(models.labels.foreground_labels), out.postprocessing)
        return models.with_postprocessing(pp)
    return models


def mask_url(output_url: str, case_id: str, ending: str = ".nii.gz", output_format: str = "nifti") -> str:
    """OUTPUT/CASE with the input's image ending: the mask is written in the input's format, as nnU-Net does; a
    DICOM series' mask is CASE.nii.gz, or CASE.seg.dcm with --output-format dicom-seg."""
    if ending == ".dcm":
        ending = ".seg.dcm" if output_format == "dicom-seg" else ".nii.gz"
    return storage.join(output_url, case_id + ending)


def case_bytes(channels: int, classes: int, padded_shape, cropped_shape) -> int:
    """Device bytes a case needs at its peak: the volume, the logit sums and weights (float32) over the padded
    grid, and the logits resampled back to the cropped input grid (twice, for the resampling's intermediate)."""
    padded, cropped = math.prod(int(s) for s in padded_shape), math.prod(int(s) for s in cropped_shape)
    return 4 * ((channels + classes + 1) * padded + 2 * classes * cropped)


def check_budget(settings: Settings, where: str, channels: int, classes: int, padded_shape, cropped_shape) -> None:
    if settings.memory_budget_gb is None:
        return
    need = case_bytes(channels, classes, padded_shape, cropped_shape) / 2 ** 30
    if need > settings.memory_budget_gb:
        raise CaseError(where, f"needs about {need:.2f} GiB for its volume and logits, more than --memory-budget-gb "
                               f"{settings.memory_budget_gb:g}; raise the budget or use a device with more memory")


@torch.inference_mode()
def predict_image(model: NnUNetModel, engines, image: CaseImage, settings: Settings, device: torch.device,
                  gaussian: torch.Tensor):
    """An image already read, whole, through one model's ``engines`` on ``device``: preprocessing, the sliding
    window (``gaussian``: trtseg.tile.model_gaussian), the export; its Exported mask on the host."""
    from trtseg.export import export_on_device, exported_on_host
    from trtseg.infer import window_logits

    with_probabilities = settings.output.save_probabilities
    if not np.any(image.data):
        return empty_export(image.shape_zyx, model, with_probabilities)
    pre = preprocess(image, model, device)
    w = settings.window
    padded, plan = plan_window(pre.data, model, w.step_size, w.use_mirroring)
    check_budget(settings, image.files[0] if image.files else "<array>", padded.shape[0], model.labels.num_heads,
                 padded.shape[1:], pre.shape_after_cropping)
    logits = window_logits(engines, padded, plan, model.labels.num_heads, gaussian, settings.engine.batch_size,
                           w.accumulate, device)
    return exported_on_host(*export_on_device(logits, pre, model, with_probabilities, w.accumulate == "fp16"), model)


def mask_predictor(model: NnUNetModel, device: "str | torch.device" = "cpu"):
    """(engines, image) -> mask (z, y, x): whole images through the pipeline on ``device``, mirroring off, as the
    reduced precisions' accuracy reports run them (trtseg.accel.precision, trtseg.accel.eight_bit). It sits here,
    below the engines' construction, because the 8-bit calibration runs it while building an engine."""
    from trtseg.options import EngineSpec, WindowOptions
    from trtseg.tile import model_gaussian

    device = torch.device(device)
    settings = Settings(window=WindowOptions(use_mirroring=False), engine=EngineSpec(device=str(device)))
    gaussian = model_gaussian(model, device)
    return lambda engines, image: predict_image(model, engines, image, settings, device, gaussian).mask


def shard(cases: list[Case], spec: str | None) -> list[Case]:
    """--shard I/N: the cases of shard I of N (0 <= I < N), by a stable hash of the case id, so that N independent
    jobs over one input cover every case exactly once (nnU-Net's -part_id/-num_parts)."""
    if not spec:
        return cases
    try:
        i, n = (int(v) for v in spec.split("/"))
        if not 0 <= i < n:
            raise ValueError
    except ValueError:
        raise TrtsegError(f"--shard {spec}: give I/N with 0 <= I < N, e.g. 0/4 ... 3/4") from None
    return [c for c in cases if ledger.shard_of(c.case_id, n) == i]


def select_cases(cases: list[Case], output_url: str, model, settings: Settings, overwrite: bool,
                 storage_options: storage.StorageOptions | None = None, input_identity: str = "metadata"
                 ) -> tuple[list[Case], dict[str, "CaseReport"]]:
    """(the cases to run, each with why and the ledger entries it replaces; {case id: report} of those skipped).

    The decision reads one listing of the ledger and one of the output (trtseg/ledger.py), and the input's
    identity from its listing, or with input_identity "hash" from its bytes."""
    settings_key = ledger.key(stamp(model, settings))
    entries = ledger.read(output_url, storage_options)
    masks = ledger.outputs(output_url, storage_options)
    todo, skipped = [], {}
    for c in cases:
        if input_identity == "hash" and not c.problem:
            c = dataclasses.replace(c, identity=ledger.content_identity(c.files, storage_options))
        out = mask_url(output_url, c.case_id, c.ending, settings.output.output_format)
        mine = entries.get(c.case_id, [])
        run, why = ledger.decide(out.rsplit("/", 1)[-1], settings_key, ledger.key(c.identity), mine, masks)
        if overwrite and not run:
            run, why = True, "--overwrite"
        if run:
            todo.append(dataclasses.replace(c, replaces=tuple(e.name for e in mine), reason=why))
        else:
            skipped[c.case_id] = CaseReport(c.case_id, "skipped", output=out, reason=why)
    return todo, skipped


def sync(device: torch.device) -> None:
    """Waits for the device's queued work, so that a stage's seconds are its own."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sync_stream(device: torch.device) -> None:
    """Waits for the work queued on this thread's current stream of ``device`` only: a case prepared on a side
    stream (trtseg.predict.read_ahead) does not wait for the inference running beside it."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def read_image(case: Case, models: ModelSet, settings: Settings,
               storage_options: storage.StorageOptions | None = None) -> CaseImage:
    """The case's image on the host, within --memory-budget-gb (what ``prepare_case`` and a read-ahead read)."""
    budget = int(settings.memory_budget_gb * 2 ** 30) if settings.memory_budget_gb else None
    return read_case(list(case.files), models.models[0].num_image_channels, storage_options, budget,
                     settings.input.given())


def prepare_case(case: Case, models: ModelSet, settings: Settings, device: torch.device,
                 storage_options: storage.StorageOptions | None = None, to_host: bool = True, index: int = 0,
                 prev: "np.ndarray | torch.Tensor | None" = None, image: CaseImage | None = None
                 ) -> tuple[dict, Any, CaseImage | None]:
    """Reads one case (unless ``image`` is given), preprocesses it for pass ``index`` of ``models`` on ``device``
    and plans its window.

    prev: the mask (z, y, x) of the stage this pass takes, for a cascade in one job; a cascade given
    --prev-stage-predictions reads its file here instead.

    Returns (meta, the padded volume (c, z, y, x) float32 or None, the image read). The volume is numpy on the host
    when ``to_host`` (it goes through Ray's object store), else a tensor on ``device``. meta holds the case id,
    files, input header and shape (z, y, x), seconds per stage, the pass's "index", what export needs ("pre"), the
    window "plan", and either "error" (the one-line error of a case that cannot run) or "empty" (an all-zero
    volume: no network run).
    """
    seconds: dict[str, float] = {}
    meta: dict[str, Any] = {"case_id": case.case_id, "files": list(case.files), "seconds": seconds,
                            "identity": case.identity, "replaces": list(case.replaces), "reason": case.reason,
                            "ending": case.ending, "index": index}
    model = models.models[index]
    try:
        if case.problem:
            raise TrtsegError(f"{case.files[0]}: {case.problem}")
        if image is None:
            t = time.perf_counter()
            image = read_image(case, models, settings, storage_options)
            seconds["read"] = time.perf_counter() - t
        # the files read: a DICOM study folder's chosen series (--series-*), whose instances a Segmentation cites
        meta.update(header=image.header, shape_zyx=image.shape_zyx, spacing_zyx=image.spacing_zyx,
                    files=list(image.files))
        if not np.any(image.data):
            meta["empty"] = True
            return meta, None, image
        if models.file_stage(index):
            prev = read_prev_stage(case, model, settings, image.shape_zyx, storage_options)
        t = time.perf_counter()
        pre = preprocess(image, model, device, prev)
        padded, plan = plan_window(pre.data, model, settings.window.step_size, settings.window.use_mirroring)
        check_budget(settings, case.files[0], padded.shape[0], model.labels.num_heads, padded.shape[1:],
                     pre.shape_after_cropping)
        volume = transfer.to_host(padded) if to_host else padded
        sync_stream(device)
        seconds["preprocess"] = time.perf_counter() - t
    except TrtsegError as e:
        meta["error"] = storage.redact(str(e))
        return meta, None, image
    except Exception as e:
        meta["error"] = storage.redact(f"{case.files[0]}: {one_line(e)}")
        return meta, None, image
    meta.update(pre={"shape_before_cropping": pre.shape_before_cropping, "bbox": pre.bbox,
                     "shape_after_cropping": pre.shape_after_cropping, "spacing_transposed": pre.spacing_transposed},
                plan=plan, volume_bytes=int(volume.nbytes) if to_host else 0)
    return meta, volume, image


def write_case(meta: dict, model, settings: Settings, output_url: str, storage_options,
               mask: np.ndarray | None, probabilities: np.ndarray | None = None) -> dict:
    """Writes a case's mask (an empty one for an all-zero volume) with its stamp, atomically, and with
    --save-probabilities nnU-Net's CASE.npz / CASE.pkl first (so a mask never exists without them).

    The model's postprocessing (trtseg/postprocess.py) is applied to the mask here, once, on every path; the
    probabilities stay as the network gave them, as nnU-Net saves them.

    Returns {"output", "seconds", "postprocessing"} or {"error", "seconds"}."""
    fmt = settings.output.output_format
    out_url = mask_url(output_url, meta["case_id"], meta["ending"], fmt)
    t = time.perf_counter()
    seconds: dict[str, float] = {}
    pp_report = None
    try:
        if mask is None:
            empty = empty_export(meta["shape_zyx"], model, settings.output.save_probabilities)
            mask, probabilities = empty.mask, empty.probabilities
        if model.postprocessing.steps:
            mask, removed = model.postprocessing.apply(mask, meta["spacing_zyx"])
            pp_report = {"kind": model.postprocessing.kind, "source": model.postprocessing.source,
                         "removed_voxels": removed}
            seconds["postprocess"] = time.perf_counter() - t
            t = time.perf_counter()
        if settings.output.save_probabilities:
            if probabilities is None:
                raise RuntimeError("--save-probabilities: the export returned no probabilities")
            write_probabilities(storage.join(output_url, meta["case_id"]), probabilities,
                                {"spacing": [float(s) for s in meta["spacing_zyx"][::-1]],
                                 "shape_zyx": list(meta["shape_zyx"])}, storage_options)
        mine = stamp(model, settings)
        if fmt != "nifti":  # the Segmentation first: a NIfTI mask (the ledger's) never exists without it
            write_segmentation(meta, mask, model, storage.join(output_url, meta["case_id"] + ".seg.dcm"), mine,
                               storage_options)
        if fmt != "dicom-seg":
            write_mask(out_url, mask, meta["header"], storage_options, settings.output.compress_level, mine)
        # the ledger entry only once the mask is committed: a run killed before leaves none
        ledger.record(output_url, ledger.Entry(meta["case_id"], ledger.key(mine), ledger.key(meta.get("identity", "")),
                                               ledger.mask_key(out_url, storage_options)),
                      {"stamp": mine, "input_identity": meta.get("identity", ""), "files": meta["files"],
                       "mask": out_url.rsplit("/", 1)[-1]}, meta.get("replaces", []), storage_options)
    except Exception as e:
        return {"error": storage.redact(f"{meta['files'][0]}: {one_line(e)}"),
                "seconds": {**seconds, "write": time.perf_counter() - t}}
    return {"output": out_url, "seconds": {**seconds, "write": time.perf_counter() - t}, "postprocessing": pp_report}


def write_segmentation(meta: dict, mask, model, url: str, made_by: str, storage_options=None) -> None:
    """CASE.seg.dcm: the mask as a DICOM Segmentation of its source series (trtseg/dicom.py), written atomically."""
    from trtseg import __version__, dicom

    if meta.get("ending") != ".dcm":
        raise TrtsegError("--output-format dicom-seg/both needs a DICOM series input, not "
                          f"{meta['ending']} files (use --output-format nifti)")
    affine = meta["header"].get_best_affine()
    origin_lps = (-float(affine[0, 3]), -float(affine[1, 3]), float(affine[2, 3]))
    data = dicom.segmentation_bytes(mask, meta["files"], origin_lps, model.labels.labels,
                                    str(getattr(model, "configuration_name", "")), model.fingerprint,
                                    f"trtseg {__version__}")
    storage.write_bytes_atomic(url, data, storage_options)


@dataclass
class CaseReport:
    """One case's entry in run_report.json, the same on every path.

    status: "ok", "failed" or "skipped"; reason: why the run did or skipped it (new, input changed, settings
    changed, mask missing, unchanged, ...); seconds: per stage (read, preprocess,
    infer, export, write). The Ray job fills the rest: tiles per actor, the owner, object-store bytes, peak memory.
    """

    case_id: str
    status: str
    output: str | None = None
    error: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    reason: str | None = None
    tiles: int | None = None
    actors: dict[str, int] | None = None
    owner: str | None = None
    redone: list[str] = field(default_factory=list)
    object_store_bytes: dict[str, int] | None = None
    peak_rss_mb: dict[str, float | None] | None = None
    peak_gpu_memory_mb: float | None = None
    engine: dict | None = None
    gpus: list[str] | None = None
    done_at_s: float | None = None  # seconds from the run's start to this case's end
    postprocessing: dict | None = None  # which postprocessing ran on the mask, and the voxels it removed

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["seconds"] = {k: round(v, 4) for k, v in self.seconds.items()}
        return d


def run_report(model, source: str | None, settings: Settings, engine: dict | None, cases: list[Case],
               results: dict[str, CaseReport], wall_seconds: float, job: dict | None = None,
               actors: list[dict] | None = None, startup: dict | None = None) -> dict:
    """run_report.json: the model, the settings, the engine, every case in input order and a summary (total, ok,
    failed, skipped, wall seconds, and the start-up's seconds before the first case could run); the Ray job adds its
    "job" settings and per-actor counters."""
    ordered = [results[c.case_id].to_json() for c in cases if c.case_id in results]
    summary: dict[str, Any] = {"total": len(ordered)}
    for status in ("ok", "failed", "skipped"):
        summary[status] = sum(r["status"] == status for r in ordered)
    summary["wall_seconds"] = round(wall_seconds, 3)
    if startup is not None:
        summary["startup_seconds"] = startup
    if actors:
        summary["engine_busy_fraction"] = {a["actor"]: round(a["engine_seconds"] / wall_seconds, 4) for a in actors}
        summary["engine_busy_in_span"] = {a["actor"]: a["engine_busy_in_span"] for a in actors}
    models = ModelSet.of(model)
    described = {"passes": models.describe()} if len(models.models) > 1 else {}
    notes = [n for m in models.models for n in m.notes]
    if notes:  # what loading found and kept (a card's norm layers)
        described["notes"] = notes
    return {"model": {"source": source, "fingerprint": models.fingerprint, "folds": models.folds,
                      "configuration": models.configuration_name, **described},
            "settings": settings.to_json(), "job": job, "engine": engine, "actors": actors or [],
            "cases": ordered, "summary": summary}


def write_report(output_url: str, report: dict, storage_options=None) -> None:
    """OUTPUT/run_report.json (the latest run), and the same report kept as OUTPUT/.trtseg/runs/RUN_ID.json."""
    data = json.dumps(report, indent=2, default=str).encode()
    import uuid
    run_id = (report.get("job") or {}).get("run_id") or uuid.uuid4().hex[:6]
    name = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{run_id}.json"  # sorts by time
    storage.write_bytes_atomic(storage.join(output_url, ledger.RUNS, name), data, storage_options)
    storage.write_bytes_atomic(storage.join(output_url, "run_report.json"), data, storage_options)
