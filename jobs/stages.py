"""The work done inside Ray workers, stage by stage. Plain functions: the driver wraps them as Ray tasks and the
inference actor calls the tile stage, so each can be tested without Ray.

prepare_case   read -> preprocess -> pad; returns the volume for the actors and what the reducer needs
infer_chunk    (in InferenceActor) a chunk of tiles -> Gaussian-weighted logits over the chunk's region, divided
               by the volume's weight map, averaged over folds: partial sums that the reducer only adds up
(finalize      in the case's owner actor: sum the partials -> crop -> export on its device)
write_case     write the mask atomically
"""
from __future__ import annotations

import resource
import time
from typing import Any

import numpy as np
import torch

from trtseg import storage, transfer
from trtseg.dataset import Case
from trtseg.errors import TrtsegError, one_line
from trtseg.export import empty_export
from trtseg.model import NnUNetModel
from trtseg.predict import Settings, check_budget
from trtseg.preprocess import preprocess
from trtseg.read import read_case
from trtseg.tile import pad_to_patch, tile_starts
from trtseg.write import write_mask


def stamp(model: NnUNetModel, settings: Settings) -> str:
    """What made a mask: model fingerprint and the settings that change masks (checked on reruns)."""
    f = settings.fingerprint_fields()
    return f"{model.fingerprint} folds={','.join(model.folds)} step={f['step_size']} tta={int(f['use_mirroring'])}"


def worker_device(settings: Settings) -> torch.device:
    """The device of a Ray worker: its GPU when Ray gave it one (CUDA_VISIBLE_DEVICES) and the job runs on GPUs."""
    return torch.device("cuda", 0) if torch.cuda.is_available() and settings.device != "cpu" else torch.device("cpu")


def peak_rss_mb() -> float:
    """This worker process's peak resident memory, in MiB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def prepare_case(case: Case, model: NnUNetModel, settings: Settings, storage_options=None) -> tuple[dict, Any]:
    """Reads and preprocesses one case. Returns (meta, padded volume (c, z, y, x) float32 numpy, or None).

    meta["error"] holds the one-line error of a case that cannot be read; its volume is None.
    """
    storage.set_default_options(storage_options)
    seconds: dict[str, float] = {}
    meta: dict[str, Any] = {"case_id": case.case_id, "files": list(case.files), "seconds": seconds}
    try:
        if case.problem:
            raise TrtsegError(f"{case.files[0]}: {case.problem}")
        t = time.perf_counter()
        image = read_case(list(case.files), model.num_input_channels)
        seconds["read"] = time.perf_counter() - t
        meta["header"] = image.header
        meta["shape_zyx"] = image.shape_zyx
        if not np.any(image.data):
            meta["empty"] = True
            return meta, None
        t = time.perf_counter()
        device = worker_device(settings)
        pre = preprocess(image, model, device)
        padded, crop = pad_to_patch(pre.data, model.patch_size)
        check_budget(settings, case.files[0], padded.shape[0], model.labels.num_heads, padded.shape[1:],
                     pre.shape_after_cropping)
        data = transfer.to_host(padded)
        seconds["preprocess"] = time.perf_counter() - t
    except TrtsegError as e:
        meta["error"] = storage.redact(str(e))
        return meta, None
    except Exception as e:
        meta["error"] = storage.redact(f"{case.files[0]}: {one_line(e)}")
        return meta, None
    meta["peak_rss_mb"] = peak_rss_mb()
    meta.update(pre={"shape_before_cropping": pre.shape_before_cropping, "bbox": pre.bbox,
                     "shape_after_cropping": pre.shape_after_cropping, "spacing_transposed": pre.spacing_transposed},
                crop=[(s.start, s.stop) for s in crop], padded_shape=tuple(data.shape[1:]),
                starts=tile_starts(data.shape[1:], model.patch_size, settings.step_size), volume_bytes=int(data.nbytes))
    return meta, data


def chunk_region(starts, tile) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(origin, shape) of the box covering the tiles at ``starts``."""
    lo = tuple(min(s[d] for s in starts) for d in range(3))
    hi = tuple(max(s[d] for s in starts) + tile[d] for d in range(3))
    return lo, tuple(h - l for h, l in zip(hi, lo))


def write_case(meta: dict, model: NnUNetModel, settings: Settings, output_url: str, storage_options,
               mask: np.ndarray | None) -> dict:
    """Writes a case's mask atomically (an empty mask for an all-zero volume). Returns seconds and the output URL."""
    storage.set_default_options(storage_options)
    out_url = storage.join(output_url, meta["case_id"] + ".nii.gz")
    t = time.perf_counter()
    try:
        if mask is None:
            mask = empty_export(meta["shape_zyx"], model).mask
        write_mask(out_url, mask, meta["header"], None, settings.compresslevel, stamp(model, settings))
    except Exception as e:
        return {"error": storage.redact(f"{meta['files'][0]}: {one_line(e)}"),
                "seconds": {"write": time.perf_counter() - t}}
    return {"output": out_url, "seconds": {"write": time.perf_counter() - t},
            "peak_rss_mb": peak_rss_mb()}
