"""Stage 3, tile: padding, sliding-window tile starts and the Gaussian importance map, as nnU-Net computes them."""
from __future__ import annotations

import functools
from functools import lru_cache
from itertools import product

import numpy as np
import torch


def pad_to_patch(data: torch.Tensor, patch_size, side: str = "centered") -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Zero-pads (c, z, y, x) to at least ``patch_size``, half below and the rest above (acvl pad_nd_image), or
    with ``side`` "end" all above (a model card's padding choice).

    Returns the padded tensor and the (z, y, x) slices that cut the original region back out.
    """
    pads, revert = [], []
    for n, p in zip(data.shape[1:], patch_size):
        diff = max(0, int(p) - int(n))
        below = 0 if side == "end" else diff // 2
        above = diff - below
        pads.append((below, above))
        revert.append(slice(below, below + int(n)))
    if any(b or a for b, a in pads):
        flat = [v for b, a in reversed(pads) for v in (b, a)]
        data = torch.nn.functional.pad(data, flat, mode="constant", value=0.0)
    return data, tuple(revert)


def compute_steps(image_size, tile_size, step_size: float) -> list[list[int]]:
    """nnU-Net's compute_steps_for_sliding_window: tile starts per axis; overlap at most 1 - step_size."""
    if not 0 < step_size <= 1:
        raise ValueError(f"step size must be in (0, 1], got {step_size}")
    steps = []
    for i, k in zip(image_size, tile_size):
        n = int(np.ceil((i - k) / (k * step_size))) + 1
        actual = (i - k) / (n - 1) if n > 1 else 99999999999
        steps.append([int(np.round(actual * j)) for j in range(n)])
    return steps


def tile_starts(image_size, tile_size, step_size: float) -> list[tuple[int, ...]]:
    """All tile starts ((z, y, x), or (y, x) for 2-D tiles), the first axis slowest, in nnU-Net's order."""
    return [tuple(s) for s in product(*compute_steps(image_size, tile_size, step_size))]  # type: ignore[misc]


@lru_cache(maxsize=8)
def _gaussian_np(tile_size: tuple[int, ...], sigma_scale: float, value_scaling_factor: float) -> np.ndarray:
    # scipy.ndimage.gaussian_filter of a centred delta (mode constant, truncate 4) is the outer product of the
    # normalized 1-D kernels, zero beyond 4 sigma + 0.5.
    axes = []
    for n in tile_size:
        sigma = n * sigma_scale
        radius = int(4.0 * sigma + 0.5)
        x = np.arange(-radius, radius + 1, dtype=np.float64)
        k = np.exp(-0.5 / (sigma * sigma) * x ** 2)
        k /= k.sum()
        line = np.zeros(n)
        offs = np.arange(n) - n // 2
        inside = np.abs(offs) <= radius
        line[inside] = k[offs[inside] + radius]
        axes.append(line)
    g = functools.reduce(np.multiply.outer, axes)  # (z, y, x), or (y, x) for a 2d model
    return g / (g.max() / value_scaling_factor)


def gaussian_importance(tile_size, device: torch.device | str = "cpu", sigma_scale: float = 1.0 / 8,
                        value_scaling_factor: float = 10.0, half: bool = True) -> torch.Tensor:
    """nnU-Net's compute_gaussian: (z, y, x) (or 2-D) weights, max ``value_scaling_factor``, zeros raised to the
    minimum.

    nnU-Net v2 keeps the map in float16; we take its float16 values (so weights are identical) as float32.
    ``half=False, value_scaling_factor=1`` is v1's _get_gaussian (float32, maximum 1).
    """
    g = torch.from_numpy(_gaussian_np(tuple(int(t) for t in tile_size), sigma_scale, value_scaling_factor))
    g = g.to(torch.float16 if half else torch.float32)
    if bool((g == 0).any()):
        g[g == 0] = g[g != 0].min()
    return g.to(device=device, dtype=torch.float32)


def model_gaussian(model, device: torch.device | str = "cpu") -> torch.Tensor:
    """The Gaussian importance map the model's nnU-Net version uses, as float32 on ``device``."""
    if model.nnunet_version == 1:
        return gaussian_importance(model.patch_size, device, value_scaling_factor=1.0, half=False)
    return gaussian_importance(model.patch_size, device)
