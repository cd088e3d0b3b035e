"""Stage 3, tile: the sliding-window plan of one volume, as nnU-Net's predict_sliding_window_return_logits makes it.

``plan_window`` pads a preprocessed volume to at least the patch (half below, the rest above), lists nnU-Net's
tile starts over the padded grid, and records the mirroring axes and v1's probability mode. A 2d model's patch
has two entries (y, x): its tiles are 2-D, one slice of the (z, y, x) volume each, every slice in turn, as nnU-Net
predicts 2d configurations; its Gaussian and mirroring are 2-D. A ``WindowPlan`` is
plain data: the Ray job's driver sends it with each chunk of tiles, and every worker cuts the same tiles from it.
The tiles' logits are summed by ``trtseg.aggregate.Merger``; ``trtseg.infer.run_tiles`` drives both.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trtseg.tile import pad_to_patch, tile_starts


@dataclass(frozen=True)
class WindowPlan:
    """Where one volume's tiles go.

    patch: the network's tile size: (z, y, x), or (y, x) for a 2d model (its tiles are single slices)
    padded_shape: (z, y, x) of the padded volume the tiles cover
    crop: per axis (start, stop) of the unpadded volume inside the padded one
    starts: every tile start (z, y, x), in nnU-Net's order (z slowest)
    mirror_axes: spatial axes of nnU-Net's mirroring test-time augmentation, None for none
    probabilities: average softmax probabilities over mirrorings (nnU-Net v1) instead of logits (v2)
    """

    patch: tuple[int, ...]
    padded_shape: tuple[int, ...]
    crop: tuple[tuple[int, int], ...]
    starts: tuple[tuple[int, ...], ...]
    mirror_axes: tuple[int, ...] | None = None
    probabilities: bool = False

    @property
    def crop_slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in self.crop)

    @property
    def slices_2d(self) -> bool:
        return len(self.patch) == 2

    @property
    def extent(self) -> tuple[int, ...]:
        """A tile's extent in the (z, y, x) volume: the patch, or (1, y, x) for a 2d model."""
        return (1, *self.patch) if self.slices_2d else self.patch

    def tile_slices(self, start) -> tuple:
        """The index of one tile in a (z, y, x) grid; for a 2d model the slice number itself, so that indexing
        drops the z axis and gives the 2-D tile."""
        if self.slices_2d:
            return (int(start[0]), *(slice(s, s + p) for s, p in zip(start[1:], self.patch)))
        return tuple(slice(s, s + p) for s, p in zip(start, self.patch))

    def gather(self, volume: torch.Tensor, starts) -> torch.Tensor:
        """The tiles at ``starts`` of a padded (c, z, y, x) volume, stacked as (b, c, *patch)."""
        return torch.stack([volume[(slice(None), *self.tile_slices(s))] for s in starts])

    def region(self, starts) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(origin, shape) (z, y, x) of the box that covers the tiles at ``starts``."""
        lo = tuple(min(s[d] for s in starts) for d in range(3))
        hi = tuple(max(s[d] for s in starts) + self.extent[d] for d in range(3))
        return lo, tuple(h - l for h, l in zip(hi, lo))


def batches(starts, batch_size: int) -> list[list]:
    """``starts`` cut into consecutive lists of at most ``batch_size``."""
    n = max(1, int(batch_size))
    return [list(starts[i:i + n]) for i in range(0, len(starts), n)]


def plan_window(data: torch.Tensor, model, step_size: float, use_mirroring: bool) -> tuple[torch.Tensor, WindowPlan]:
    """Pads preprocessed ``data`` (c, z, y, x) to the model's patch and plans its tiles.

    Returns the padded volume (same device and dtype) and its plan."""
    patch = tuple(int(p) for p in model.patch_size)
    padded, crop = pad_to_patch(data, (1, *patch) if len(patch) == 2 else patch, getattr(model, "pad_side", "centered"))
    shape = tuple(int(s) for s in padded.shape[1:])
    if len(patch) == 2:  # every slice, z slowest, then nnU-Net's 2-D steps (predict_sliding_window's 2d branch)
        starts = tuple((z, *yx) for z in range(shape[0]) for yx in tile_starts(shape[1:], patch, step_size))
    else:
        starts = tuple(tile_starts(shape, patch, step_size))
    return padded, WindowPlan(patch=patch, padded_shape=shape, crop=tuple((s.start, s.stop) for s in crop),
                              starts=starts,
                              mirror_axes=model.mirror_axes if use_mirroring else None,
                              probabilities=model.aggregates_probabilities)
