"""Stage 5, aggregate: Gaussian-weighted sum of tile logits into the full (padded) volume.

nnU-Net accumulates in float16 on the device; trtseg accumulates in float32 by default (twice the memory, no
rounding of the running sums), with nnU-Net's float16 Gaussian weights. ``accumulate_dtype=torch.float16``
reproduces nnU-Net's arithmetic where memory is short.
"""
from __future__ import annotations

import torch


class Accumulator:
    """Sums weighted tile logits and their weights over a volume.

    num_classes: logit channels k
    shape: (z, y, x) of the padded volume the tiles cover
    gaussian: (tz, ty, tx) importance map on ``device``
    """

    def __init__(self, num_classes: int, shape, gaussian: torch.Tensor, device: torch.device | str,
                 accumulate_dtype: torch.dtype = torch.float32):
        self.tile = tuple(int(t) for t in gaussian.shape)
        self.gaussian = gaussian.to(device)
        self.logits = torch.zeros((num_classes, *shape), dtype=accumulate_dtype, device=device)
        self.weights = torch.zeros(tuple(shape), dtype=accumulate_dtype, device=device)
        self.tiles_added = 0

    def _slices(self, start) -> tuple[slice, ...]:
        return tuple(slice(s, s + t) for s, t in zip(start, self.tile))

    def add(self, logits: torch.Tensor, starts) -> None:
        """Adds tile logits (b, k, tz, ty, tx) at tile starts [(z, y, x)] * b."""
        logits = logits.to(self.logits.device)
        for tile_logits, start in zip(logits, starts):
            sl = self._slices(start)
            self.logits[(slice(None), *sl)] += tile_logits * self.gaussian
            self.weights[sl] += self.gaussian
            self.tiles_added += 1

    def result(self, crop: tuple[slice, ...] | None = None) -> torch.Tensor:
        """Weighted mean logits (k, z, y, x) float32, cut to ``crop`` (undoing the padding)."""
        out = (self.logits.float() / self.weights.float())
        if crop is not None:
            out = out[(slice(None), *crop)]
        if not torch.isfinite(out).all():
            raise RuntimeError("aggregated logits hold NaN or Inf (a voxel no tile covered, or an engine overflow)")
        return out


def weight_map(shape, starts, gaussian: torch.Tensor) -> torch.Tensor:
    """The sum of Gaussian weights over every tile of a volume: (z, y, x) float32 on the Gaussian's device.

    It depends on geometry only, so each worker that holds part of a volume can compute it for itself.
    """
    tile = tuple(int(t) for t in gaussian.shape)
    w = torch.zeros(tuple(int(s) for s in shape), dtype=torch.float32, device=gaussian.device)
    for st in starts:
        w[tuple(slice(s, s + t) for s, t in zip(st, tile))] += gaussian
    return w
