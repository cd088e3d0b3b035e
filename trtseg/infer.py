"""Stage 4, infer: batches of tiles through the engines, with nnU-Net's mirroring test-time augmentation (v2 averages
logits over the mirrorings, v1 softmax probabilities), summed into a Merger.

``run_tiles`` is the one sliding-window loop: the single-process path runs it over all of a volume's tiles, a Ray
actor over the chunk of tiles it was sent.
"""
from __future__ import annotations

import contextlib
import itertools
from typing import TYPE_CHECKING, Callable, ContextManager, Sequence

import torch

from trtseg.window import WindowPlan, batches

if TYPE_CHECKING:
    from trtseg.accel.engine import Engine
    from trtseg.aggregate import Merger


def mirror_combinations(mirror_axes: tuple[int, ...] | None) -> list[tuple[int, ...]]:
    """Spatial-axis flips nnU-Net averages, as tensor dims of a (b, c, z, y, x) batch: every non-empty subset."""
    if not mirror_axes:
        return []
    dims = [a + 2 for a in mirror_axes]
    return [c for i in range(len(dims)) for c in itertools.combinations(dims, i + 1)]


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def run_engine(engine: Engine, batch: torch.Tensor) -> torch.Tensor:
    """Runs ``batch`` through ``engine`` in chunks of at most ``engine.max_batch``.

    An out-of-memory error halves the chunk and tries again, down to one tile; only a single tile that does not
    fit is an error. The halved size is kept for the engine's later batches.
    """
    limit = min(batch.shape[0], engine.max_batch or batch.shape[0], engine.oom_batch_limit or batch.shape[0])
    while True:
        try:
            if limit >= batch.shape[0]:
                return engine.infer(batch)
            return torch.cat([engine.infer(batch[i:i + limit]) for i in range(0, batch.shape[0], limit)])
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not _is_oom(e) or limit == 1:
                raise
            if batch.device.type == "cuda":
                torch.cuda.empty_cache()
            limit = max(1, limit // 2)
            engine.oom_batch_limit = limit


@torch.inference_mode()
def predict_tiles(engine: Engine, tiles: torch.Tensor, mirror_axes: tuple[int, ...] | None,
                  probabilities: bool = False) -> torch.Tensor:
    """Logits of ``tiles`` (b, c, z, y, x): the plain prediction, averaged with every mirrored one when enabled.

    probabilities: softmax each prediction before averaging, as nnU-Net v1 does (it aggregates probabilities)
    Returns (b, k, z, y, x) float32 on the engine's device.
    """
    def run(x: torch.Tensor) -> torch.Tensor:
        out = run_engine(engine, x)
        return torch.softmax(out, dim=1) if probabilities else out

    combos = mirror_combinations(mirror_axes)
    pred = run(tiles)
    for dims in combos:
        pred += torch.flip(run(torch.flip(tiles, dims)), dims)
    if combos:
        pred /= len(combos) + 1
    return pred


# timing(kind) -> a context manager around one batch that yields a factory of context managers around its engine
# calls; kind is "case" (a volume's first batch on this worker), "chunk" (a chunk's first) or "batch"
BatchTiming = Callable[[str], ContextManager[Callable[[], ContextManager]]]


@contextlib.contextmanager
def _untimed(kind: str):
    yield contextlib.nullcontext


@torch.inference_mode()
def run_tiles(engines: "Sequence[Engine]", volume: torch.Tensor, plan: WindowPlan, starts, batch_size: int,
              merger: "Merger", timing: BatchTiming | None = None, first: str = "chunk") -> None:
    """Runs the tiles at ``starts`` of the padded ``volume`` (c, z, y, x) through every engine (one a fold) in
    batches of ``batch_size`` and adds their logits to ``merger``; then records the tiles as covered.

    timing: how a Ray actor measures its GPU time per batch (trtseg/jobs/timeline.py); first: the first batch's kind."""
    timing = timing or _untimed
    kind = first
    for fold, engine in enumerate(engines):
        for chunk in batches(starts, batch_size):
            with timing(kind) as engine_timer:
                tiles = plan.gather(volume, chunk).to(engine.device)
                with engine_timer():
                    logits = predict_tiles(engine, tiles, plan.mirror_axes, plan.probabilities)
                merger.add(logits, chunk, fold)
            kind = "batch"
    merger.cover(starts)


def window_logits(engines: "Sequence[Engine]", volume: torch.Tensor, plan: WindowPlan, num_heads: int,
                  gaussian: torch.Tensor, batch_size: int, accumulate: str, device: torch.device) -> torch.Tensor:
    """Logits (k, z, y, x) float32 of a padded volume (c, z, y, x) over its unpadded grid: every tile of ``plan``
    through ``engines`` (their mean), Gaussian-weighted into a Merger on ``device`` and normalized."""
    from trtseg.aggregate import Merger

    merger = Merger(plan, num_heads, gaussian, len(engines), accumulate)
    run_tiles(engines, volume.to(device), plan, plan.starts, batch_size, merger)
    return merger.finalize()
