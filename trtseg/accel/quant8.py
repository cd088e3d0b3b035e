"""8-bit convolutions for the PyTorch engine: formats, scales, calibration, and the reference network they define.

Formats: ``fp8`` (e4m3, ``torch.float8_e4m3fn``: largest finite value 448, no infinities) and ``int8`` (symmetric,
[-127, 127], zero point 0). Weights get one scale per output channel, each convolution's input one scale, as in
TensorRT's explicit quantization and NVIDIA's MLPerf 3D-UNet INT8 entry.

Which layers: every 3-D (or 2-D) convolution and transposed convolution except the segmentation head, whose output
is the logits nnU-Net's argmax reads. InstanceNorm statistics and LeakyReLU are not convolutions: they stay in the
precision the engine runs them in.

Calibration: activation ranges observed at each layer's input on real patches (``trtseg.accel.patches
.sample_patches``, the patches ``trtseg export --calibration`` cuts), by the same three methods: ``minmax`` (the
largest |x|), ``percentile`` (the 99.99th percentile of |x|) and ``entropy`` (TensorRT's KL-divergence threshold
over a 2048-bin histogram of |x| with 128 quantization levels; for fp8, whose levels are not uniform, the same
threshold is used as its range).

Reference: ``quantize_network`` replaces each layer with one that quantizes its input and its weights and
convolves the dequantized values in float32. A product of two 8-bit values is exact in float32, so this is the
function an 8-bit tensor-core kernel computes, up to the order of its float32 sums. It is what the accuracy gate
(``trtseg.accel.precision.gate``) measures and what faster kernels are checked against; it is not faster itself.
"""
from __future__ import annotations

import copy
import hashlib
import json

import numpy as np
import torch
import torch.nn.functional as F

#: format -> (storage dtype, largest finite magnitude)
FORMATS: dict[str, tuple[torch.dtype, float]] = {"fp8": (torch.float8_e4m3fn, 448.0), "int8": (torch.int8, 127.0)}
METHODS = ("minmax", "percentile", "entropy")
_CONVS = (torch.nn.Conv3d, torch.nn.Conv2d, torch.nn.ConvTranspose3d, torch.nn.ConvTranspose2d)
_TINY = 1e-12  # the smallest scale: an all-zero channel or input quantizes to zeros, never to NaN


def quantize(x: torch.Tensor, scale: torch.Tensor | float, fmt: str) -> torch.Tensor:
    """``x / scale`` stored in ``fmt``: saturated at the format's largest finite value, int8 rounded half to
    even. ``scale`` broadcasts against ``x`` (one value, or per channel shaped to it)."""
    dtype, top = FORMATS[fmt]
    y = (x.float() / scale).clamp(-top, top)
    return (torch.round(y) if fmt == "int8" else y).to(dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """The float32 values ``q`` (from ``quantize``) stands for."""
    return q.float() * scale


def weight_axis(layer: torch.nn.Module) -> int:
    """The output-channel axis of a layer's weight: 0 for a convolution, 1 for a transposed one (in, out, ...)."""
    return 1 if isinstance(layer, (torch.nn.ConvTranspose3d, torch.nn.ConvTranspose2d)) else 0


def weight_scales(weight: torch.Tensor, fmt: str, axis: int = 0) -> torch.Tensor:
    """One scale per output channel (``axis``), shaped to broadcast against ``weight``: the channel's largest |w|
    over the format's largest value, so that it maps to exactly that value."""
    dims = [d for d in range(weight.dim()) if d != axis]
    amax = weight.detach().float().abs().amax(dim=dims)
    shape = [1] * weight.dim()
    shape[axis] = -1
    return (amax / FORMATS[fmt][1]).clamp_min(_TINY).view(shape)


def quantizable_layers(network: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The network's convolutions to run in 8 bits, by module name: every one but the segmentation head (nnU-Net's
    ``seg_layers``; for another network, the last convolution registered)."""
    convs = {n: m for n, m in network.named_modules() if isinstance(m, _CONVS)}
    heads = [n for n in convs if "seg_layers" in n.split(".")] or list(convs)[-1:]
    return {n: m for n, m in convs.items() if n not in heads}


def _kl_threshold(hist: np.ndarray, levels: int = 128) -> int:
    """TensorRT's entropy calibration: the number of leading bins of ``hist`` (counts of |x|, uniform bins from 0)
    whose range, quantized to ``levels`` levels, loses the least information (KL divergence) against the
    histogram with its tail folded into the last kept bin."""
    hist = hist.astype(np.float64)
    best, best_i = np.inf, len(hist)
    for i in range(levels, len(hist) + 1):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        nonzero = p > 0
        if not nonzero.any():
            continue
        # q: the i bins merged into `levels` groups, each group's count spread evenly over its nonzero bins
        group = np.arange(i) * levels // i
        counts = np.bincount(group, weights=hist[:i], minlength=levels)
        filled = np.bincount(group, weights=nonzero.astype(np.float64), minlength=levels)
        q = np.where(nonzero, counts[group] / np.maximum(filled[group], 1), 0.0)
        if q.sum() == 0:
            continue
        pn, qn = p[nonzero] / p.sum(), np.maximum(q[nonzero] / q.sum(), 1e-12)
        kl = float(np.sum(pn * np.log(pn / qn)))
        if kl < best:
            best, best_i = kl, i
    return best_i


def calibrate(network: torch.nn.Module, patches: torch.Tensor, fmt: str, method: str = "minmax",
              batch: int = 1, percentile: float = 99.99, bins: int = 2048) -> dict[str, float]:
    """Each quantizable layer's input scale, by ``method``, from ``patches`` (n, c, z, y, x) float32 run through
    ``network`` (in eval mode, on the patches' device) ``batch`` at a time. minmax needs one pass; percentile and
    entropy a second one, for histograms of |x| over [0, the layer's largest |x|]."""
    if method not in METHODS:
        raise ValueError(f"calibration method must be one of {METHODS}, not {method!r}")
    top = FORMATS[fmt][1]
    layers = quantizable_layers(network)
    amax: dict[str, float] = {n: 0.0 for n in layers}
    hists: dict[str, torch.Tensor] = {}

    def observe(name: str, second_pass: bool):
        def hook(_module, inputs):
            x = inputs[0].detach().float().abs()
            if not second_pass:
                amax[name] = max(amax[name], float(x.max()))
            elif amax[name] > 0:
                h = torch.histc(x, bins=bins, min=0.0, max=amax[name]).cpu()
                hists[name] = hists[name] + h if name in hists else h
        return hook

    def run(second_pass: bool) -> None:
        handles = [m.register_forward_pre_hook(observe(n, second_pass)) for n, m in layers.items()]
        try:
            with torch.no_grad():
                for i in range(0, patches.shape[0], batch):
                    network(patches[i:i + batch])
        finally:
            for h in handles:
                h.remove()

    network.eval()
    run(False)
    if method == "minmax":
        return {n: max(a / top, _TINY) for n, a in amax.items()}
    run(True)
    scales = {}
    for n, a in amax.items():
        if n not in hists or a == 0:
            scales[n] = _TINY
            continue
        h = hists[n].numpy()
        if method == "percentile":
            cum = np.cumsum(h) / max(h.sum(), 1)
            edge = int(np.searchsorted(cum, percentile / 100.0)) + 1
        else:
            edge = _kl_threshold(h)
        scales[n] = max(a * min(edge, bins) / bins / top, _TINY)
    return scales


class QuantConv(torch.nn.Module):
    """A convolution (or transposed convolution) run on 8-bit inputs and weights: its input quantized with one
    scale, its weights per output channel, the dequantized values convolved in float32 (exact products; see the
    module docstring), the output in the input's dtype. The bias stays as it was."""

    def __init__(self, layer: torch.nn.Module, input_scale: float, fmt: str):
        super().__init__()
        self.layer, self.fmt, self.input_scale = layer, fmt, float(input_scale)
        axis = weight_axis(layer)
        w = layer.weight.detach().float()
        scales = weight_scales(w, fmt, axis)
        self.register_buffer("weight_q", dequantize(quantize(w, scales, fmt), scales), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = dequantize(quantize(x, self.input_scale, self.fmt), self.input_scale)
        m = self.layer
        bias = m.bias.float() if m.bias is not None else None
        if isinstance(m, (torch.nn.ConvTranspose3d, torch.nn.ConvTranspose2d)):
            conv_t = F.conv_transpose3d if isinstance(m, torch.nn.ConvTranspose3d) else F.conv_transpose2d
            y = conv_t(xq, self.weight_q, bias, m.stride, m.padding, m.output_padding, m.groups, m.dilation)
        else:
            y = m._conv_forward(xq, self.weight_q, bias)
        return y.to(x.dtype)


def replace_layers(network: torch.nn.Module, replacements: dict[str, torch.nn.Module]) -> None:
    """Puts each module of ``replacements`` (by module name) in place of that layer, wherever ``network`` holds it:
    nnU-Net's blocks call their convolution through an ``all_modules`` Sequential that holds the same module as
    their ``conv`` attribute, so replacing the attribute alone would leave the forward pass unchanged."""
    by_id = {id(network.get_submodule(name)): new for name, new in replacements.items()}
    for parent in list(network.modules()):
        for child_name, child in list(parent.named_children()):
            if id(child) in by_id:
                setattr(parent, child_name, by_id[id(child)])


def quantize_network(network: torch.nn.Module, input_scales: dict[str, float], fmt: str) -> torch.nn.Module:
    """A copy of ``network`` whose layers named in ``input_scales`` (``calibrate``'s result) run as QuantConv."""
    net = copy.deepcopy(network)
    replace_layers(net, {name: QuantConv(net.get_submodule(name), scale, fmt) for name, scale in input_scales.items()})
    return net


def calibration_key(model_fingerprint: str, fold: str, fmt: str, method: str, calibration_identity: str,
                    patch_shape) -> tuple[str, dict]:
    """(key, fields) of a calibration in the engine cache: everything its scales depend on. The calibration
    data's identity is the listing identity of its cases (trtseg.dataset.Case.identity), so replaced volumes
    calibrate again."""
    fields = {"model": model_fingerprint, "fold": str(fold), "format": fmt, "method": method,
              "calibration": calibration_identity, "patch": [int(s) for s in patch_shape], "version": 1}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24], fields
