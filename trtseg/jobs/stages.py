"""The job's Ray tasks: the shared case stages (``trtseg.pipeline``) run in a Ray worker, plus what the run report
wants to know of that worker (its peak memory).

prepare_task   read -> preprocess -> window plan for one model (pass), on the worker's device; the padded
               volume goes to the object store
(the tiles     run by InferenceActor: ``trtseg.infer.run_tiles`` into a ``trtseg.aggregate.Merger`` per case)
write_task     the mask (and probabilities) written atomically with the rerun stamp
"""
from __future__ import annotations

import resource
from typing import Any

import torch

from trtseg import storage
from trtseg.dataset import Case
from trtseg.options import Settings
from trtseg.pipeline import prepare_case, write_case


def worker_device(settings: Settings) -> torch.device:
    """The device of a Ray worker: its GPU when Ray gave it one (CUDA_VISIBLE_DEVICES) and the job runs on GPUs."""
    return torch.device("cuda", 0) if torch.cuda.is_available() and settings.engine.device != "cpu" \
        else torch.device("cpu")


def peak_rss_mb() -> float:
    """This worker process's peak resident memory, in MiB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def prepare_task(case: Case, models, settings: Settings, storage_options=None, index: int = 0, prev=None
                 ) -> tuple[dict, Any]:
    """``prepare_case`` for pass ``index`` on the worker's device, the volume as numpy for the object store.

    prev: the mask (z, y, x) of the stage a one-job cascade takes (the owner actor's result, numpy). A later pass
    reads the image again: one more read per model beside the object store holding every case's image."""
    storage.set_default_options(storage_options)
    meta, volume, _ = prepare_case(case, models, settings, worker_device(settings), None, True, index, prev)
    meta["peak_rss_mb"] = peak_rss_mb()
    return meta, volume


def write_task(meta: dict, model, settings: Settings, output_url: str, storage_options, mask, probabilities=None
               ) -> dict:
    """``write_case`` in a worker."""
    storage.set_default_options(storage_options)
    result = write_case(meta, model, settings, output_url, None, mask, probabilities)
    result["peak_rss_mb"] = peak_rss_mb()
    return result
