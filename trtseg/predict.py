"""One case through every stage: read -> preprocess -> tile -> infer -> aggregate -> export -> write.

``Predictor`` holds the model and one engine per fold; ``predict_case`` runs a case and returns its report entry.
The Ray job (jobs/) spreads the same stages over many processes; this is the single-process path and the
reference the job is tested against.
"""
from __future__ import annotations

import dataclasses
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from accel.engines import Engine, create_engines
from trtseg import storage
from trtseg.aggregate import Accumulator
from trtseg.dataset import Case
from trtseg.errors import CaseError, TrtsegError, one_line
from trtseg.export import Exported, empty_export, export
from trtseg.infer import predict_tiles
from trtseg.model import NnUNetModel
from trtseg.preprocess import Preprocessed, preprocess
from trtseg.read import CaseImage, read_case
from trtseg.tile import model_gaussian, pad_to_patch, tile_starts
from trtseg.write import write_mask, write_probabilities


@dataclass
class Settings:
    """What a prediction run does; plain data, so it crosses process boundaries.

    step_size: tile step as a fraction of the patch (nnU-Net's default 0.5)
    use_mirroring: mirroring test-time augmentation over the checkpoint's allowed axes
    device: "cpu", "cuda" or "cuda:N"; None picks cuda when available
    batch_size: tiles per engine call
    precision: engine precision ("fp32", "fp16", "bf16"); CUDA default fp16 (nnU-Net's autocast), CPU fp32
    engine: auto (TensorRT if it imports and a GPU exists, then PyTorch CUDA, then ONNX Runtime on the CPU),
            tensorrt, torch, onnxruntime or pycuda
    engine_cache: URL where exported ONNX graphs and TensorRT engines are kept (default $TRTSEG_CACHE or
            ~/.cache/trtseg)
    compile: torch.compile the PyTorch engine: True, or "max-autotune" (Triton kernels timed against cuDNN's)
    memory_budget_gb: a case whose volume and logits would need more (see ``case_bytes``) fails with a clear error
            instead of running out of memory midway; None: no limit
    """

    step_size: float = 0.5
    use_mirroring: bool = True
    engine: str = "auto"
    engine_cache: str | None = None
    device: str | None = None
    batch_size: int = 2
    precision: str | None = None
    compile: bool | str = False
    cuda_graphs: bool = False
    channels_last: bool = False
    half_weights: bool = False
    fold_convolutions: bool = False
    merge_upsampling: bool = False
    fuse_norms: bool = False
    save_probabilities: bool = False
    compresslevel: int = 6
    memory_budget_gb: float | None = None

    def resolved_device(self) -> torch.device:
        if self.device:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def resolved_precision(self) -> str:
        return self.precision or ("fp16" if self.resolved_device().type == "cuda" else "fp32")

    def fingerprint_fields(self) -> dict:
        """The settings that change a mask (used to decide whether an existing output can be kept)."""
        return {"step_size": self.step_size, "use_mirroring": self.use_mirroring}


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


class Timer:
    """Wall-clock seconds per stage; synchronizes CUDA at stage boundaries so times are honest."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


@dataclass
class CaseResult:
    case_id: str
    status: str  # "ok", "failed" or "skipped"
    output: str | None = None
    error: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["seconds"] = {k: round(v, 4) for k, v in self.seconds.items()}
        return d


class Predictor:
    """The model's folds as engines on one device, and the sliding window over them."""

    def __init__(self, model: NnUNetModel, settings: Settings, engines: list[Engine] | None = None):
        self.model = model
        self.settings = settings
        self.device = settings.resolved_device()
        if engines is None:
            engines = create_engines(model, settings.engine, self.device, settings.resolved_precision(),
                                     settings.compile, settings.engine_cache, max(settings.batch_size, 1),
                                     settings.cuda_graphs, settings.channels_last, settings.half_weights,
                                     settings.fold_convolutions, settings.merge_upsampling, settings.fuse_norms)
        self.engines = engines
        self.gaussian = model_gaussian(model, self.device)

    @property
    def mirror_axes(self) -> tuple[int, ...] | None:
        return self.model.mirror_axes if self.settings.use_mirroring else None

    @torch.inference_mode()
    def logits(self, data: torch.Tensor) -> torch.Tensor:
        """Sliding-window logits (k, z, y, x) float32 of preprocessed ``data`` (c, z, y, x), mean over folds."""
        padded, crop = pad_to_patch(data, self.model.patch_size)
        starts = tile_starts(padded.shape[1:], self.model.patch_size, self.settings.step_size)
        total = None
        bs = max(1, self.settings.batch_size)
        for engine in self.engines:
            acc = Accumulator(self.model.labels.num_heads, padded.shape[1:], self.gaussian, self.device)
            for i in range(0, len(starts), bs):
                chunk = starts[i:i + bs]
                tiles = torch.stack([padded[(slice(None), *(slice(s, s + p) for s, p in zip(st, self.model.patch_size)))]
                                     for st in chunk])
                acc.add(predict_tiles(engine, tiles.to(engine.device), self.mirror_axes,
                                      self.model.nnunet_version == 1), chunk)
            fold_logits = acc.result(crop)
            total = fold_logits if total is None else total.add_(fold_logits)
        assert total is not None
        if len(self.engines) > 1:
            total /= len(self.engines)
        return total

    @torch.inference_mode()
    def predict_image(self, image: CaseImage, timer: Timer | None = None) -> Exported:
        timer = timer or Timer(self.device)
        if not np.any(image.data):
            return empty_export(image.shape_zyx, self.model, self.settings.save_probabilities)
        with timer.stage("preprocess"):
            pre: Preprocessed = preprocess(image, self.model, self.device)
        padded = [max(n, p) for n, p in zip(pre.data.shape[1:], self.model.patch_size)]
        check_budget(self.settings, image.files[0] if image.files else "<array>", pre.data.shape[0],
                     self.model.labels.num_heads, padded, pre.shape_after_cropping)
        with timer.stage("infer"):
            logits = self.logits(pre.data)
        with timer.stage("export"):
            return export(logits, pre, self.model, self.settings.save_probabilities)

    def predict_case(self, case: Case, output_folder: str,
                     storage_options: storage.StorageOptions | None = None) -> CaseResult:
        """Reads, predicts and writes one case. Bad input fails this case only: no output file is written."""
        out_url = storage.join(output_folder, case.case_id + ".nii.gz")
        timer = Timer(self.device)
        try:
            if case.problem:
                raise TrtsegError(f"{case.files[0]}: {case.problem}")
            with timer.stage("read"):
                image = read_case(list(case.files), self.model.num_input_channels, storage_options)
            result = self.predict_image(image, timer)
            with timer.stage("write"):
                if result.probabilities is not None:
                    write_probabilities(storage.join(output_folder, case.case_id), result.probabilities,
                                        {"spacing": list(image.spacing_zyx[::-1]), "shape_zyx": list(image.shape_zyx)},
                                        storage_options)
                write_mask(out_url, result.mask, image.header, storage_options, self.settings.compresslevel)
        except TrtsegError as e:
            return CaseResult(case.case_id, "failed", error=str(e), seconds=timer.seconds)
        except Exception as e:  # an unexpected failure still fails one case, named, not the run
            return CaseResult(case.case_id, "failed", error=f"{case.files[0]}: {one_line(e)}",
                              seconds=timer.seconds)
        return CaseResult(case.case_id, "ok", output=out_url, seconds=timer.seconds)


def predict_folder(input_url: str, output_url: str, model_folder: "str | NnUNetModel", folds: list[str] | None = None,
                   checkpoint_name: str = "checkpoint_final.pth", settings: Settings | None = None,
                   storage_options: storage.StorageOptions | None = None, limit: int | None = None,
                   dry_run: bool = False, log=print) -> dict:
    """Single-process prediction of every case in ``input_url``; writes OUTPUT/run_report.json, returns the report.

    Cases fail one at a time: a bad case is reported with its error and the others still run.
    """
    import json
    from trtseg.dataset import list_cases
    from trtseg.model import load_model_folder

    settings = settings or Settings()
    t0 = time.perf_counter()
    if not dry_run:
        storage.check_writable(output_url, storage_options)
        storage.remove_stale_parts(output_url, storage_options)
    model = model_folder if isinstance(model_folder, NnUNetModel) else load_model_folder(model_folder, folds, checkpoint_name)
    cases = list_cases(input_url, model.num_input_channels, storage_options)
    if limit is not None:
        cases = cases[:limit]
    if dry_run:
        for c in cases:
            log(f"would run {c.case_id}: {', '.join(c.files)}")
        return {"dry_run": True, "cases": [c.case_id for c in cases]}
    predictor = Predictor(model, settings)
    results = []
    for i, case in enumerate(cases):
        r = predictor.predict_case(case, output_url, storage_options)
        results.append(r)
        log(f"[{i + 1}/{len(cases)}] {case.case_id}: {r.status}" + (f" ({r.error})" if r.error else ""))
    report = {
        "model": {"folder": model.folder, "fingerprint": model.fingerprint, "folds": model.folds,
                  "configuration": model.configuration_name},
        "settings": dataclasses.asdict(settings),
        "engine": predictor.engines[0].describe(),
        "cases": [r.to_json() for r in results],
        "summary": {"total": len(results), "ok": sum(r.status == "ok" for r in results),
                    "failed": sum(r.status == "failed" for r in results),
                    "wall_seconds": round(time.perf_counter() - t0, 3)},
    }
    storage.write_bytes_atomic(storage.join(output_url, "run_report.json"),
                               json.dumps(report, indent=2).encode(), storage_options)
    return report
