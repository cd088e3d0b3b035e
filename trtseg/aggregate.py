"""Stage 5, aggregate: the Merger, where the Gaussian-weighted logits of a volume's tiles are summed.

One Merger holds one volume's sums on one device. The single-process path keeps one per case; in the Ray job each
actor that ran some of a case's tiles keeps one, the helpers hand theirs over as ``partial``s, and the owner
``finalize``s. The same code runs either way, so the same settings give the same masks (MONAI's Splitter/Merger
split, with nnU-Net's numerics).

nnU-Net v2 (2.5 and later) accumulates in float16: each fold's weighted logits and Gaussian weights are summed in
float16, divided in float16, the folds' results summed in float16 and divided by their count. Its rounding is
largest where few tiles overlap with small Gaussian weights (a volume's borders), and a cascade feeds the low-res
stage's flipped voxels on to the next stage. trtseg sums in float32 by default (``accumulate="fp32"``: no
rounding of the running sums, with nnU-Net's float16 Gaussian values, folds in one buffer divided by their count
at the end). ``accumulate="fp16"`` (--accumulate fp16) repeats nnU-Net's float16 steps and their order, for masks
equal to nnUNetv2_predict's own; with one actor per case (several actors add normalized shares in another order).
"""
from __future__ import annotations

import numpy as np
import torch

from trtseg import transfer
from trtseg.window import WindowPlan


def weight_map(plan: WindowPlan, gaussian: torch.Tensor) -> torch.Tensor:
    """The sum of Gaussian weights over every tile of a volume: (z, y, x) in the Gaussian's dtype (float32, or
    float16 for nnU-Net's own float16 sums), on its device.

    It depends on geometry only, so each worker that holds part of a volume can compute it for itself.
    """
    w = torch.zeros(plan.padded_shape, dtype=gaussian.dtype, device=gaussian.device)
    for st in plan.starts:
        w[plan.tile_slices(st)] += gaussian
    return w


class Merger:
    """Sums of Gaussian-weighted tile logits over one volume's padded grid, for every fold.

    plan: the volume's window (its padded shape and every tile start)
    num_heads: k, the network's output channels
    gaussian: (tz, ty, tx) (or (ty, tx) for a 2d model) float32 importance map, on the device the sums live on
    folds: how many engines add every tile (their mean is taken in ``normalized``)

    ``add`` takes one engine's logits for a batch; ``cover`` records that a batch's tiles went through every fold.
    ``covered`` is what a restarted Ray actor has lost: the driver checks it on every call.
    """

    def __init__(self, plan: WindowPlan, num_heads: int, gaussian: torch.Tensor, folds: int = 1,
                 accumulate: str = "fp32"):
        self.plan = plan
        self.gaussian = gaussian
        self.folds = folds
        self.half = accumulate == "fp16"
        # fp16: one float16 buffer per fold, as nnU-Net runs a sliding window per fold; fp32: one for all folds
        buffers = folds if self.half else 1
        dtype = torch.float16 if self.half else torch.float32
        self.sum = torch.zeros((buffers, num_heads, *plan.padded_shape), dtype=dtype, device=gaussian.device)
        self.covered: list[tuple[int, ...]] = []

    @property
    def device(self) -> torch.device:
        return self.sum.device

    def add(self, logits: torch.Tensor, starts, fold: int = 0) -> None:
        """Adds fold ``fold``'s engine's tile logits (b, k, *patch) float32 at tile starts [(z, y, x)] * b, one tile
        after the other (in float16 each addition rounds, as nnU-Net's)."""
        logits = logits.to(self.sum.device)
        acc = self.sum[fold if self.half else 0]
        for tile_logits, start in zip(logits, starts):
            acc[(slice(None), *self.plan.tile_slices(start))] += tile_logits * self.gaussian

    def cover(self, starts) -> None:
        self.covered += [tuple(s) for s in starts]

    def normalized(self, region: tuple[slice, ...] | None = None) -> torch.Tensor:
        """The fold-mean weighted logits over ``region`` of the padded grid (default all of it), (k, ...) float32.

        Divided by the whole volume's weight map, so helpers' shares only need adding up. The map is made here
        (one launch a tile), which in an actor runs on the export thread, off the tile thread."""
        region = region or tuple(slice(0, n) for n in self.plan.padded_shape)
        if self.half:  # nnU-Net's steps: per fold sum / weights in float16, the folds summed, / their count
            weights = weight_map(self.plan, self.gaussian.half())[region]
            out = self.sum[(0, slice(None), *region)] / weights
            for f in range(1, self.folds):
                out += self.sum[(f, slice(None), *region)] / weights
            return (out / self.folds if self.folds > 1 else out).float()
        weights = weight_map(self.plan, self.gaussian)
        out = self.sum[(0, slice(None), *region)] / weights[region]
        return out / self.folds if self.folds > 1 else out

    def partial(self, dtype: torch.dtype = torch.float16) -> tuple[tuple[int, ...], torch.Tensor]:
        """This worker's share for the case's owner: (origin (z, y, x), (k, dz, dy, dx) in ``dtype``) over the box of
        the tiles it covered, already normalized."""
        origin, shape = self.plan.region(self.covered)
        region = tuple(slice(o, o + n) for o, n in zip(origin, shape))
        return origin, self.normalized(region).to(dtype)

    def finalize(self, partials=()) -> torch.Tensor:
        """The volume's logits (k, z, y, x) float32, cropped back to the unpadded grid: this worker's normalized sums
        plus every other worker's ``partial`` (origin, numpy or tensor)."""
        logits = self.normalized()
        self.sum = torch.empty(0, device=self.device)  # freed before the export allocates
        for origin, part in partials:
            part = transfer.to_device(part, self.device) if isinstance(part, np.ndarray) else part.to(self.device)
            region = tuple(slice(o, o + n) for o, n in zip(origin, part.shape[1:]))
            logits[(slice(None), *region)] += part.float()
        logits = logits[(slice(None), *self.plan.crop_slices)]
        if not torch.isfinite(logits).all():
            raise RuntimeError("aggregated logits hold NaN or Inf (a voxel no tile covered, or an engine overflow)")
        return logits
