"""Host <-> GPU copies through pinned (page-locked) memory.

From pageable memory the CUDA driver copies through its own small pinned buffers, chunk by chunk, and the calling
thread waits for all of it. Here the bytes go once into a pinned buffer from PyTorch's caching host allocator (a
multi-threaded host copy), and the GPU's copy engine moves them from there on the current stream: to the device
without the host waiting, back to the host as one DMA. The allocator reuses each pinned buffer once the copies
queued on it have finished. On a CPU device nothing is copied.
"""
from __future__ import annotations

import numpy as np
import torch


def to_device(array: np.ndarray, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``array`` on ``device`` as ``dtype`` (when given), queued on the current stream. On a GPU the cast runs there,
    after the copy: an int16 volume crosses as half the bytes of its float32 values."""
    device = torch.device(device)
    src = torch.from_numpy(array)
    if device.type != "cuda":
        return src.to(dtype) if dtype is not None and src.dtype != dtype else src
    pinned = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
    pinned.copy_(src)
    out = pinned.to(device, non_blocking=True)
    return out.to(dtype) if dtype is not None and out.dtype != dtype else out


def to_host(tensor: torch.Tensor) -> np.ndarray:
    """A tensor's values as a C-contiguous numpy array, after the current stream's work on it has finished."""
    if tensor.device.type != "cuda":
        return tensor.contiguous().numpy()
    pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    pinned.copy_(tensor, non_blocking=True)
    torch.cuda.current_stream(tensor.device).synchronize()
    return pinned.numpy()
