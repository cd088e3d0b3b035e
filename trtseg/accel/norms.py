"""Norm layers kept as trained, in every engine.

trtseg runs networks in eval mode. For most layers that is what their authors mean; for a norm layer it can
change the function. PyTorch's InstanceNorm with ``track_running_stats=True`` normalizes each input by its own
statistics in training mode and by the stored running statistics in eval mode. A network handed over with such a
layer still in training mode (as it was trained, and as its own predictor runs it) holds no meaningful running
statistics: eval mode would silently make it another function. ``keep_as_trained`` finds those layers and keeps
their per-input statistics (``track_running_stats`` off, which every engine keeps: PyTorch as it is, ONNX as
InstanceNormalization, and TensorRT from that graph).

BatchNorm that would normalize with a batch's statistics (training mode without usable running statistics, or
``track_running_stats=False``) depends on which tiles happen to share a batch: no engine can keep it per scan, and
it is refused with one line. BatchNorm with running statistics runs in eval mode as its authors evaluated it.
"""
from __future__ import annotations

import torch

from trtseg.errors import ModelFolderError

_INSTANCE = (torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d)
_BATCH = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)


def keep_as_trained(net: torch.nn.Module, where: str) -> list[str]:
    """Prepares ``net`` (as its callable returned it, weights loaded) for eval mode without changing its function.

    Returns notes for the run report, one per kind of layer found; raises ModelFolderError for a norm layer no
    engine can keep."""
    kept, own, running = [], 0, 0
    for name, m in net.named_modules():
        if isinstance(m, _INSTANCE):
            if m.track_running_stats and m.training:
                # eval mode now normalizes by the input's own statistics, as trained; without the buffers the
                # layer is plain InstanceNorm to every exporter (with them, ONNX's sees a running-stats update)
                m.track_running_stats = False
                m.running_mean = m.running_var = m.num_batches_tracked = None
                kept.append(name)
            elif not m.track_running_stats:
                own += 1
            else:
                running += 1
        elif isinstance(m, _BATCH) and m.training:
            tracked = m.track_running_stats and m.num_batches_tracked is not None and int(m.num_batches_tracked) > 0
            if not tracked:
                raise ModelFolderError(where, f"{type(m).__name__} '{name}' is in training mode without running "
                                              "statistics: it normalizes by each batch of tiles, which no engine can "
                                              "keep per scan; return the network in eval mode, with trained running "
                                              "statistics")
    notes = []
    if kept:
        notes.append(f"{len(kept)} InstanceNorm layer(s) in training mode with running statistics ({kept[0]}, ...): "
                     "kept normalizing each input by its own statistics, as trained")
    if own:
        notes.append(f"{own} InstanceNorm layer(s) normalize each input by its own statistics")
    if running:
        notes.append(f"{running} InstanceNorm layer(s) in eval mode use their running statistics")
    return notes
