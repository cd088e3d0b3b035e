"""Stage 5, aggregate: the Merger, where the Gaussian-weighted logits of a volume's tiles are summed.

One Merger holds one volume's sums on one device. The single-process path keeps one per case; in the Ray job each
actor that ran some of a case's tiles keeps one, the helpers hand theirs over as ``partial``s, and the owner
``finalize``s. The same code runs either way, so the same settings give the same masks (MONAI's Splitter/Merger
split, with nnU-Net's numerics).

nnU-Net accumulates in float16 on the device; trtseg sums in float32 (no rounding of the running sums), with
nnU-Net's float16 Gaussian values. Folds are summed into the same buffer and divided by the fold count at the end
(nnU-Net averages each fold's normalized logits: equal up to float32 rounding).
"""
from __future__ import annotations

import numpy as np
import torch

from trtseg import transfer
from trtseg.window import WindowPlan


def weight_map(plan: WindowPlan, gaussian: torch.Tensor) -> torch.Tensor:
    """The sum of Gaussian weights over every tile of a volume: (z, y, x) float32 on the Gaussian's device.

    It depends on geometry only, so each worker that holds part of a volume can compute it for itself.
    """
    w = torch.zeros(plan.padded_shape, dtype=torch.float32, device=gaussian.device)
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

    def __init__(self, plan: WindowPlan, num_heads: int, gaussian: torch.Tensor, folds: int = 1):
        self.plan = plan
        self.gaussian = gaussian
        self.folds = folds
        self.sum = torch.zeros((num_heads, *plan.padded_shape), dtype=torch.float32, device=gaussian.device)
        self.covered: list[tuple[int, ...]] = []

    @property
    def device(self) -> torch.device:
        return self.sum.device

    def add(self, logits: torch.Tensor, starts) -> None:
        """Adds one engine's tile logits (b, k, *patch) float32 at tile starts [(z, y, x)] * b."""
        logits = logits.to(self.sum.device)
        for tile_logits, start in zip(logits, starts):
            self.sum[(slice(None), *self.plan.tile_slices(start))] += tile_logits * self.gaussian

    def cover(self, starts) -> None:
        self.covered += [tuple(s) for s in starts]

    def normalized(self, region: tuple[slice, ...] | None = None) -> torch.Tensor:
        """The fold-mean weighted logits over ``region`` of the padded grid (default all of it), (k, ...) float32.

        Divided by the whole volume's weight map, so helpers' shares only need adding up. The map is made here
        (one launch a tile), which in an actor runs on the export thread, off the tile thread."""
        region = region or tuple(slice(0, n) for n in self.plan.padded_shape)
        weights = weight_map(self.plan, self.gaussian)
        out = self.sum[(slice(None), *region)] / weights[region]
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
