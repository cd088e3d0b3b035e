"""The decoder's transposed convolution merged into the convolution after it: one convolution on the coarse volume.

An nnU-Net decoder stage upsamples the stage below with a transposed convolution (kernel = stride = s per axis),
concatenates the skip, and convolves (kernel k, padding (k-1)//2, stride 1):

    y = conv(cat(T(low), skip)) = conv_up(T(low)) + conv_skip(skip)

Nothing nonlinear lies between T and conv_up, so conv_up(T(low)) is one linear map of ``low``. Along an axis, fine
position p = s*q + r (phase r in [0, s)) reads T's outputs p-P .. p+P, which come from coarse positions q+m_lo(r) ..
q+m_hi(r), m(r, d) = floor((r + d - P) / s). So the map is, per phase, a small convolution of ``low``: all phases
together are one convolution with s_z*s_y*s_x*C_out output channels and a kernel of L = max_r(m_hi - m_lo + 1) per
axis (2 for nnU-Net's s = 2, k = 3). Its output channels are ordered so that, read along each axis as (coarse index,
slot), they are the fine volume shifted by a few positions: putting them in place is a reshape and a slice
(``slots_to_volume``), which torch.compile turns into index arithmetic inside the normalization's kernels.

T's bias: T(low) + b_T is zero outside the volume (conv_up pads it with zeros), so the bias cannot be a constant;
``low`` gets one channel of ones (zero in the padding), whose weights in T are b_T. Rounded up to a multiple of 8
channels for cuDNN's tensor-core kernels.

Why: for the 32->320 CT model the full-resolution stage did T (64->32, 0.65 ms for four 128^3 tiles on the H100),
a concatenation copy (0.70 ms) and a 64->32 convolution at 128^3 (3.6 ms, 260 TFLOP/s). Merged, the upsampled half
is a 72->256 convolution at 65^3 with 65 % of those multiply-adds, on wide tiles (0.84 ms), beside a 32->32
convolution of the skip; the concatenation is gone. The network's kernels per batch of 4 go from 17.2 to 15.1 ms
(``benchmarks.engine_profile``, with --fold-convolutions and max-autotune).

Values: the same function; products are summed in another order and T's output is no longer rounded to the
network's precision before the convolution, so results equal the original up to float rounding.
"""
from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F

CHANNELS_LAST = torch.channels_last_3d
CHANNEL_MULTIPLE = 8  # cuDNN's fp16 tensor-core kernels want channel counts in multiples of 8


def axis_phases(stride: int, kernel: int) -> tuple[int, int, int]:
    """For one axis: (L, padding, lead). The merged kernel is L wide, with ``padding`` zeros on both sides of the
    coarse axis. Its output at coarse index j, slot rho, is fine position s*j + rho - lead: the fine axis is the
    (j, rho) grid read in order, less ``lead`` positions at its start."""
    half = (kernel - 1) // 2
    m_lo = [(r - half) // stride for r in range(stride)]  # phase r at coarse q reads q + m_lo[r] .. q + m_hi[r]
    m_hi = [(r + half) // stride for r in range(stride)]
    width = max(h - lo + 1 for lo, h in zip(m_lo, m_hi))
    padding = -min(m_lo)
    offsets = [lo + padding for lo in m_lo]  # phase r at coarse q is the output at j = q + offsets[r]
    if 2 * padding < width - 1 + max(offsets):  # the output would not reach the last phase's index
        raise ValueError(f"cannot merge a stride-{stride} upsampling into a kernel-{kernel} convolution")
    return width, padding, -(half + stride * min(m_lo))


def _axis_map(stride: int, kernel: int) -> torch.Tensor:
    """E[rho, l, d, t] = 1 where slot rho's merged tap l sees conv tap d through T's kernel position t. Fine position
    p = s*q + r is slot rho = (r - half) mod s at j = q + m_lo[r] + padding, so that s*j + rho = p + lead."""
    width, padding, _ = axis_phases(stride, kernel)
    half = (kernel - 1) // 2
    e = torch.zeros((stride, width, kernel, stride), dtype=torch.float64)
    for r, d in itertools.product(range(stride), range(kernel)):
        m, t = divmod(r + d - half, stride)  # conv tap d of phase r reads T's position t of coarse q + m
        e[(r - half) % stride, m - (r - half) // stride, d, t] = 1  # tap l = m - m_lo[r]
    return e


def merge_weights(t_weight: torch.Tensor, up_weight: torch.Tensor, stride: tuple[int, int, int]) -> torch.Tensor:
    """T's weight (C_low, C_up, s_z, s_y, s_x) and conv_up's (C_out, C_up, k_z, k_y, k_x) -> the merged convolution's
    (s_z*s_y*s_x*C_out, C_low, L_z, L_y, L_x), in float64 on the CPU; output channel ((rho_z*s_y + rho_y)*s_x +
    rho_x)*C_out + c is channel c at slots (rho_z, rho_y, rho_x)."""
    ez, ey, ex = (_axis_map(s, k) for s, k in zip(stride, up_weight.shape[2:]))
    merged = torch.einsum("alds,bmet,cnfu,kodef,iostu->abckilmn", ez, ey, ex, up_weight.double().cpu(),
                          t_weight.double().cpu())
    s_z, s_y, s_x, c_out, c_low, l_z, l_y, l_x = merged.shape
    return merged.reshape(s_z * s_y * s_x * c_out, c_low, l_z, l_y, l_x)


def slots_to_volume(merged: torch.Tensor, stride: tuple[int, int, int], lead: tuple[int, int, int],
                    fine_shape: tuple[int, int, int]) -> torch.Tensor:
    """The merged convolution's output (b, s_z*s_y*s_x*C, J_z, J_y, J_x) -> the fine volume (b, C, Z, Y, X): each
    axis's (j, rho) grid in order, less ``lead`` positions at the start. A reshape and a slice, without gathering:
    in eager mode one copy; under torch.compile, index arithmetic in the kernels that read it."""
    b, channels, j_z, j_y, j_x = merged.shape
    s_z, s_y, s_x = stride
    c = channels // (s_z * s_y * s_x)
    grid = merged.view(b, s_z, s_y, s_x, c, j_z, j_y, j_x).permute(0, 4, 5, 1, 6, 2, 7, 3)
    grid = grid.reshape(b, c, j_z * s_z, j_y * s_y, j_x * s_x)
    (z0, y0, x0), (z, y, x) = lead, fine_shape
    return grid[:, :, z0:z0 + z, y0:y0 + y, x0:x0 + x]


class MergedUpsamplingStage(torch.nn.Module):
    """A decoder stage (transposed convolution, concatenation with the skip, conv blocks) with the transposed
    convolution merged into the first block's convolution. ``forward(low, skip)`` returns the stage's output."""

    ones: torch.Tensor  # (1, bias_channels, 1, 1, 1): 1 in the first channel, the one T's bias rides on

    def __init__(self, transpconv: torch.nn.ConvTranspose3d, stage: Any):  # stage: a StackedConvBlocks
        super().__init__()
        first = stage.convs[0]
        conv = first.conv
        if not mergeable(transpconv, conv):
            raise ValueError(f"cannot merge {transpconv} into {conv}")
        c_up = transpconv.out_channels
        self.stride: tuple[int, int, int] = tuple(transpconv.stride)  # type: ignore[assignment]
        axes = [axis_phases(s, k) for s, k in zip(self.stride, conv.kernel_size)]
        self.padding = tuple(a[1] for a in axes)
        self.lead = tuple(a[2] for a in axes)
        t_weight = transpconv.weight.detach()
        self.bias_channels = 0
        if transpconv.bias is not None:  # T's bias rides on a channel of ones (zero in the padding)
            c_low = t_weight.shape[0]
            self.bias_channels = -(-(c_low + 1) // CHANNEL_MULTIPLE) * CHANNEL_MULTIPLE - c_low
            extra = t_weight.new_zeros((self.bias_channels, *t_weight.shape[1:]))
            extra[0] = transpconv.bias.detach().view(-1, 1, 1, 1)
            t_weight = torch.cat((t_weight, extra))
            ones = torch.zeros((1, self.bias_channels, 1, 1, 1), dtype=t_weight.dtype, device=t_weight.device)
            ones[0, 0] = 1
            self.register_buffer("ones", ones)
        merged = merge_weights(t_weight, conv.weight.detach()[:, :c_up], self.stride)
        self.merged_weight = torch.nn.Parameter(merged.to(conv.weight.device, conv.weight.dtype), requires_grad=False)
        self.skip_conv = torch.nn.Conv3d(conv.in_channels - c_up, conv.out_channels, conv.kernel_size,
                                         padding=conv.padding, bias=conv.bias is not None, device=conv.weight.device,
                                         dtype=conv.weight.dtype)
        with torch.no_grad():
            self.skip_conv.weight.copy_(conv.weight[:, c_up:])
            if conv.bias is not None and self.skip_conv.bias is not None:
                self.skip_conv.bias.copy_(conv.bias)
        self.after_conv = torch.nn.Sequential(*list(first.all_modules)[1:])  # dropout, norm, nonlin, in its order
        self.rest = torch.nn.Sequential(*list(stage.convs)[1:])

    def merged_slots(self, low: torch.Tensor) -> torch.Tensor:
        """The merged convolution's output (b, s_z*s_y*s_x*C_out, J_z, J_y, J_x), in slot order, from low
        (b, C_low, Z, Y, X)."""
        if self.bias_channels:
            ones = self.ones.to(low.dtype).expand(low.shape[0], -1, *low.shape[2:])
            low = torch.cat((low, ones), 1)
            if self.merged_weight.stride(1) == 1:  # channels-last weights: keep the input channels-last too
                low = low.contiguous(memory_format=CHANNELS_LAST)
        return F.conv3d(low, self.merged_weight, None, padding=self.padding)

    def upsampled_part(self, low: torch.Tensor) -> torch.Tensor:
        """conv_up(T(low)) (b, C_out, s_z*Z, s_y*Y, s_x*X) from low (b, C_low, Z, Y, X)."""
        fine = tuple(s * n for s, n in zip(self.stride, low.shape[2:]))
        return slots_to_volume(self.merged_slots(low), self.stride, self.lead, fine)  # type: ignore[arg-type]

    def forward(self, low: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        y = self.upsampled_part(low) + self.skip_conv(skip)
        return self.rest(self.after_conv(y))


def _first_conv(stage: Any) -> torch.nn.Module | None:
    """The first convolution of a ``StackedConvBlocks`` stage (``convs[0].conv``, followed by ``all_modules[1:]``)."""
    convs = getattr(stage, "convs", None)
    first = convs[0] if convs is not None and len(convs) else None
    if first is None or not hasattr(first, "all_modules") or getattr(first, "conv", None) is not first.all_modules[0]:
        return None
    return first.conv


def mergeable(transpconv: Any, conv: Any) -> bool:
    return (isinstance(transpconv, torch.nn.ConvTranspose3d) and isinstance(conv, torch.nn.Conv3d)
            and transpconv.kernel_size == transpconv.stride and transpconv.padding == (0, 0, 0)
            and transpconv.output_padding == (0, 0, 0) and transpconv.groups == 1 and transpconv.dilation == (1, 1, 1)
            and conv.stride == (1, 1, 1) and conv.groups == 1 and conv.dilation == (1, 1, 1)
            and conv.padding_mode == "zeros" and all(k % 2 for k in conv.kernel_size)
            and conv.padding == tuple((k - 1) // 2 for k in conv.kernel_size)
            and conv.in_channels > transpconv.out_channels)


class MergedUpsamplingDecoder(torch.nn.Module):
    """nnU-Net's ``UNetDecoder`` (dynamic-network-architectures) with each mergeable stage merged; the same forward
    (skips in computation order, bottleneck last; deep supervision as the decoder has it set)."""

    def __init__(self, decoder: Any):  # a dynamic-network-architectures UNetDecoder
        super().__init__()
        self.decoder: Any = decoder
        self.merged = torch.nn.ModuleList(
            MergedUpsamplingStage(t, stage) if mergeable(t, _first_conv(stage)) else torch.nn.Identity()
            for t, stage in zip(decoder.transpconvs, decoder.stages))
        self.count = sum(isinstance(m, MergedUpsamplingStage) for m in self.merged)

    def forward(self, skips):
        low, outputs = skips[-1], []
        stages = len(self.decoder.stages)
        for s in range(stages):
            skip = skips[-(s + 2)]
            merged: Any = self.merged[s]  # a MergedUpsamplingStage, a stand-in for one, or Identity
            if not isinstance(merged, torch.nn.Identity) and skip.shape[2:] == tuple(
                    n * f for n, f in zip(low.shape[2:], merged.stride)):
                low = merged(low, skip)
            else:
                low = self.decoder.stages[s](torch.cat((self.decoder.transpconvs[s](low), skip), 1))
            if self.decoder.deep_supervision:
                outputs.append(self.decoder.seg_layers[s](low))
            elif s == stages - 1:
                outputs.append(self.decoder.seg_layers[-1](low))
        outputs = outputs[::-1]
        return outputs if self.decoder.deep_supervision else outputs[0]


def merge_upsampling(network: torch.nn.Module) -> int:
    """Replaces, in place, the decoder of an nnU-Net v2 network (``network.decoder``, a dynamic-network-architectures
    ``UNetDecoder`` of 3D convolutions) by its merged twin; returns how many stages were merged (0: left as it was,
    e.g. a 2D network or another architecture)."""
    decoder = getattr(network, "decoder", None)
    if decoder is None or not all(hasattr(decoder, a) for a in ("transpconvs", "stages", "seg_layers",
                                                                  "deep_supervision")):
        return 0
    twin = MergedUpsamplingDecoder(decoder)
    if twin.count:
        network.decoder = twin
    return twin.count
