"""Stage 4, infer: one batch of tiles through an engine, with nnU-Net's mirroring test-time augmentation (v2 averages
logits over the mirrorings, v1 softmax probabilities)."""
from __future__ import annotations

import itertools

import torch

from accel.engines import Engine


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
    limit = min(batch.shape[0], engine.max_batch or batch.shape[0], getattr(engine, "oom_batch_limit", None) or batch.shape[0])
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
            engine.oom_batch_limit = limit  # type: ignore[attr-defined]


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
