"""InstanceNorm fused into the full-resolution convolutions of an fp16 nnU-Net network on CUDA (``--fuse-norms``).

nnU-Net's blocks are conv -> InstanceNorm -> LeakyReLU. At full resolution each unfused block's normalization reads
the convolution's output for its statistics, reads it again to normalize and writes the result: three passes over
128 MiB per 128^3 tile, about 0.55 ms of the H100's memory bandwidth for a batch of four, besides the convolution.
This rewrite replaces, in place, the blocks where that pays with Triton kernels (``trtseg.accel.rewrites.triton_fusion``):

- the first block (1..4 input channels): ``FusedStem``; the convolution is computed twice, once for the statistics
  and once to write the normalized output, and its raw output is never written;
- each 3x3x3 ``channels`` -> ``channels`` block (32 -> 32, full resolution, by default; ``FUSED_WIDTHS``):
  ``FusedConvNormAct``; the convolution (width-folded by 2, as ``trtseg.accel.rewrites.conv_fold`` does) adds each
  channel's sum and sum of squares as it writes, so the statistics pass is gone;
- the skip half of a merged decoder stage at those widths (``trtseg.accel.rewrites.upsample_merge``): the same kernel also adds
  the merged upsampling's output as it writes (``FusedMergedStage``): the statistics pass and the second read of the
  sum are gone;
- the last block and the segmentation head: ``FusedConvNormActHead`` normalizes, activates and applies the 1x1x1
  head in one pass; the normalized volume is never written.

Other blocks stay as they were, and so does every block whose input is not an fp16 channels-last CUDA tensor (the
fused modules fall back to the original ones). Values: the same function; products and statistics are summed in
another order (fp32 sums and sums of squares instead of Welford's updates), so logits equal the unfused network's
up to fp16 rounding.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from trtseg.accel.rewrites import triton_fusion
from trtseg.accel.rewrites.conv_fold import WidthFoldedConv3d, foldable

CHANNELS_LAST = torch.channels_last_3d


# ---- custom ops: opaque to torch.compile, which compiles the normalization arithmetic around them ----------------

@torch.library.custom_op("trtseg::conv3x3x3_stats", mutates_args=())
def _conv3x3x3_stats(x: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor | None, fold: int,
                     slots: torch.Tensor | None, slot_stride: list[int], slot_lead: list[int]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, sums, squares = triton_fusion.conv3x3x3(x, taps, bias, fold=fold, stats=True, slots=slots,
                                               slot_stride=tuple(slot_stride),  # type: ignore[arg-type]
                                               slot_lead=tuple(slot_lead))  # type: ignore[arg-type]
    return y, sums, squares


@_conv3x3x3_stats.register_fake
def _(x, taps, bias, fold, slots, slot_stride, slot_lead):
    b, _, d, h, w = x.shape
    cout = taps.shape[1] // fold
    y = torch.empty((b, cout, d, h, w), device=x.device, dtype=x.dtype, memory_format=CHANNELS_LAST)
    return y, x.new_empty((b, cout), dtype=torch.float32), x.new_empty((b, cout), dtype=torch.float32)


@torch.library.custom_op("trtseg::stem_conv_norm_act", mutates_args=())
def _stem(x: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor | None, norm_weight: torch.Tensor | None,
          norm_bias: torch.Tensor | None, eps: float, slope: float) -> torch.Tensor:
    return triton_fusion.stem_conv_norm_act(x, taps, bias, norm_weight, norm_bias, eps, slope)


@_stem.register_fake
def _(x, taps, bias, norm_weight, norm_bias, eps, slope):
    b, _, d, h, w = x.shape
    return torch.empty((b, taps.shape[1], d, h, w), device=x.device, dtype=x.dtype, memory_format=CHANNELS_LAST)


@torch.library.custom_op("trtseg::norm_act_pointwise", mutates_args=())
def _head(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor,
          bias: torch.Tensor | None, classes: int, slope: float) -> torch.Tensor:
    return triton_fusion.norm_act_pointwise(x, scale, shift, weight, bias, classes, slope)


@_head.register_fake
def _(x, scale, shift, weight, bias, classes, slope):
    b, _, d, h, w = x.shape
    return torch.empty((b, classes, d, h, w), device=x.device, dtype=x.dtype)


# ---- what a block is -----------------------------------------------------------------------------------------------

class BlockParts:
    """The parts of an nnU-Net ``ConvDropoutNormReLU`` (conv, [dropout], norm, nonlin) that the fused kernels need:
    a 3x3x3 stride-1 padding-1 convolution, InstanceNorm (affine or not, no running statistics) and LeakyReLU or
    ReLU. ``parts(block)`` returns None for any other block."""

    def __init__(self, conv: torch.nn.Conv3d, norm: Any, slope: float):
        self.conv, self.norm, self.slope = conv, norm, slope
        self.eps = float(norm.eps)

    def conv_bias(self) -> torch.Tensor | None:
        return None if self.conv.bias is None else self.conv.bias.detach().half().clone()

    def norm_affine(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self.norm.affine:
            return None, None
        return self.norm.weight.detach().float().clone(), self.norm.bias.detach().float().clone()


def parts(block: Any) -> BlockParts | None:
    modules = list(getattr(block, "all_modules", []))
    if getattr(block, "conv", None) is None or not modules or modules[0] is not block.conv:
        return None
    modules = [m for m in modules[1:] if not isinstance(m, torch.nn.modules.dropout._DropoutNd)]
    if len(modules) != 2:
        return None
    norm, nonlin = modules
    norm = getattr(norm, "norm", norm)  # an _Fp32Norm wrapper (fp16 weights) holds the norm itself
    conv = block.conv.conv if isinstance(block.conv, WidthFoldedConv3d) else block.conv
    if not foldable(conv):  # the kernels' convolution: 3x3x3, stride 1, zero padding 1, as folding needs
        return None
    if not isinstance(norm, torch.nn.InstanceNorm3d) or norm.track_running_stats:
        return None
    if isinstance(nonlin, torch.nn.LeakyReLU):
        slope = float(nonlin.negative_slope)
    elif isinstance(nonlin, torch.nn.ReLU):
        slope = 0.0
    else:
        return None
    return BlockParts(conv, norm, slope)


def _fast(x: torch.Tensor) -> bool:
    """Whether the kernels take x (after ``_channels_last``): a 5-d fp16 CUDA tensor (or CPU tensor, in Triton's
    interpreter)."""
    return (x.is_cuda or triton_fusion.interpreted()) and x.dtype == torch.float16 and x.dim() == 5


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """x in channels-last-3d order: itself when it already is (compiled graphs may hand on other strides)."""
    return x if x.is_contiguous(memory_format=CHANNELS_LAST) else x.contiguous(memory_format=CHANNELS_LAST)


def _normalize_act(y: torch.Tensor, sums: torch.Tensor, squares: torch.Tensor, p: "_FusedBlock") -> torch.Tensor:
    """LeakyReLU(InstanceNorm(y)) from y's sums: plain torch arithmetic, one pointwise kernel under torch.compile."""
    scale, shift = p.scale_shift(sums, squares, y[0, 0].numel())
    v = y.float() * scale[:, :, None, None, None] + shift[:, :, None, None, None]
    return F.leaky_relu(v, p.slope).to(y.dtype)


# ---- the fused modules ---------------------------------------------------------------------------------------------

class _FusedBlock(torch.nn.Module):
    """What every fused block keeps: the original block (for inputs the kernels do not take), the convolution's
    fp16 bias, the norm's fp32 affine parameters and eps, and the activation's slope."""

    norm_weight: torch.Tensor | None
    norm_bias: torch.Tensor | None

    def __init__(self, block: torch.nn.Module, p: BlockParts):
        super().__init__()
        self.block = block
        self.slope, self.eps = p.slope, p.eps
        self.register_buffer("bias", p.conv_bias(), persistent=False)
        weight, bias = p.norm_affine()
        self.register_buffer("norm_weight", weight, persistent=False)
        self.register_buffer("norm_bias", bias, persistent=False)

    def scale_shift(self, sums: torch.Tensor, squares: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        return triton_fusion.norm_scale_shift(sums, squares, count, self.norm_weight, self.norm_bias, self.eps)


class FusedConvNormAct(_FusedBlock):
    """A conv -> InstanceNorm -> LeakyReLU block whose convolution writes the norm's statistics (Triton, folded by
    2 where the width allows)."""

    def __init__(self, block: torch.nn.Module, p: BlockParts):
        super().__init__(block, p)
        self.register_buffer("taps2", triton_fusion.taps_weight(p.conv.weight, 2), persistent=False)
        self.register_buffer("taps1", triton_fusion.taps_weight(p.conv.weight, 1), persistent=False)

    def conv_stats(self, x: torch.Tensor, slots: torch.Tensor | None = None, slot_stride=(1, 1, 1),
                   slot_lead=(0, 0, 0)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fold = 2 if x.shape[-1] % 2 == 0 else 1
        x = _channels_last(x)
        return torch.ops.trtseg.conv3x3x3_stats(x, self.taps2 if fold == 2 else self.taps1, self.bias, fold, slots,
                                                list(slot_stride), list(slot_lead))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _fast(x):
            return self.block(x)
        return _normalize_act(*self.conv_stats(x), self)


class FusedStem(_FusedBlock):
    """The first block (a few input channels): convolution, InstanceNorm and LeakyReLU in two Triton passes."""

    def __init__(self, block: torch.nn.Module, p: BlockParts):
        super().__init__(block, p)
        self.register_buffer("taps", triton_fusion.stem_taps(p.conv.weight), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _fast(x):
            return self.block(x)
        return torch.ops.trtseg.stem_conv_norm_act(_channels_last(x), self.taps, self.bias, self.norm_weight,
                                                   self.norm_bias, self.eps, self.slope)


class FusedConvNormActHead(torch.nn.Module):
    """The network's last block and its 1x1x1 segmentation head: the convolution writes the norm's statistics, and
    one pass normalizes, activates and applies the head. Returns the logits; the decoder's head becomes Identity."""

    def __init__(self, block: torch.nn.Module, p: BlockParts, head: torch.nn.Conv3d):
        super().__init__()
        self.fused = FusedConvNormAct(block, p)
        self.head = head
        self.register_buffer("head_weight", triton_fusion.head_weight(head.weight), persistent=False)
        self.register_buffer("head_bias", None if head.bias is None else head.bias.detach().half().clone(),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _fast(x):
            return self.head(self.fused.block(x))
        y, sums, squares = self.fused.conv_stats(x)
        scale, shift = self.fused.scale_shift(sums, squares, y[0, 0].numel())
        return torch.ops.trtseg.norm_act_pointwise(y, scale, shift, self.head_weight, self.head_bias,
                                                   self.head.out_channels, self.fused.slope)


class FusedMergedStage(torch.nn.Module):
    """A merged decoder stage (``MergedUpsamplingStage``) whose skip convolution also adds the merged upsampling's
    output and writes the norm's statistics."""

    def __init__(self, stage: Any, p: BlockParts):
        super().__init__()
        self.stage = stage
        self.stride = stage.stride  # MergedUpsamplingDecoder checks it against the skip's shape
        self.skip = FusedConvNormAct(torch.nn.Sequential(stage.skip_conv, stage.after_conv), p)

    def forward(self, low: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        stage = self.stage
        if not (_fast(low) and _fast(skip)):
            return stage(low, skip)
        slots = _channels_last(stage.merged_slots(low))
        y, sums, squares = self.skip.conv_stats(skip, slots, stage.stride, stage.lead)
        return stage.rest(_normalize_act(y, sums, squares, self.skip))


# ---- the rewrite ---------------------------------------------------------------------------------------------------

def _stage_blocks(stage: Any) -> Any:
    """The ``convs`` of a ``StackedConvBlocks`` stage, or of the one inside an encoder stage (pooling, blocks)."""
    if hasattr(stage, "convs"):
        return stage.convs
    for child in stage.children() if isinstance(stage, torch.nn.Sequential) else []:
        if hasattr(child, "convs"):
            return child.convs
    return None


def _square(conv: torch.nn.Conv3d, channels: tuple[int, ...]) -> bool:
    """A ``width`` -> ``width`` convolution with ``width`` in ``channels``."""
    return conv.in_channels == conv.out_channels and conv.in_channels in channels


def _tensor_core_width(n: int) -> bool:
    """Triton's tensor-core tiles: a power of two, 16 or more (nnU-Net's 32 is)."""
    return n >= 16 and n & (n - 1) == 0


# the widths whose channels -> channels blocks are fused: full resolution only. Fusing the 64 -> 64 blocks too gained
# nothing on an NVIDIA H200: in the engine their Triton convolutions took 1.67 ms per batch of 4 where cuDNN's took
# 1.33, and that ate the statistics and normalize passes they save (docs/performance.md)
FUSED_WIDTHS: tuple[int, ...] = (32,)


def fuse_norms(network: torch.nn.Module, stem_channels: int = 4) -> int:
    """Replaces, in place, the blocks of an nnU-Net v2 network (dynamic-network-architectures ``PlainConvUNet``
    encoder stages or a ``ResidualEncoderUNet``'s stem; a plain or merged ``UNetDecoder``) that the fused kernels
    serve; returns how many were replaced (0: left as it was); the channels -> channels blocks fused are those of
    ``FUSED_WIDTHS``. Apply it to the fp16, channels-last network (after
    ``merge_upsampling`` and ``fold_narrow_convolutions``): the kernels read its fp16 weights. Needs Triton."""
    channels = FUSED_WIDTHS
    if not triton_fusion.available():
        raise RuntimeError("--fuse-norms needs Triton (it ships with CUDA builds of PyTorch)")
    count = 0
    encoder = getattr(network, "encoder", None)
    stem = getattr(encoder, "stem", None)  # ResidualEncoderUNet's
    stages = [stem] if stem is not None else []
    stages += list(getattr(encoder, "stages", []))
    first = True
    for stage in stages:
        blocks = _stage_blocks(stage)
        for i, block in enumerate(blocks if blocks is not None else []):
            p = parts(block)
            cin, cout = (p.conv.in_channels, p.conv.out_channels) if p is not None else (0, 0)
            if p is not None and first and cin <= stem_channels and _tensor_core_width(cout):
                blocks[i] = FusedStem(block, p)
                count += 1
            elif p is not None and _square(p.conv, channels):
                blocks[i] = FusedConvNormAct(block, p)
                count += 1
            first = False
    decoder = getattr(network, "decoder", None)
    merged: Any = getattr(decoder, "merged", None)  # a MergedUpsamplingDecoder's stages
    plain = getattr(decoder, "decoder", decoder)
    if plain is None or not hasattr(plain, "stages"):
        return count
    for s, stage in enumerate(plain.stages):
        merged_stage = merged[s] if merged is not None else None
        if merged_stage is not None and hasattr(merged_stage, "skip_conv"):
            sp = parts(_FakeBlock(merged_stage.skip_conv, merged_stage.after_conv))
            if sp is not None and _square(sp.conv, channels):
                merged[s] = FusedMergedStage(merged_stage, sp)
                count += 1
            blocks = merged_stage.rest
        else:
            blocks = _stage_blocks(stage)
        last_stage = s == len(plain.stages) - 1
        for i, block in enumerate(blocks if blocks is not None else []):
            p = parts(block)
            if p is None or not _square(p.conv, channels):
                continue
            head = plain.seg_layers[-1]
            if (last_stage and i == len(blocks) - 1 and not plain.deep_supervision
                    and isinstance(head, torch.nn.Conv3d) and head.kernel_size == (1, 1, 1)):
                blocks[i] = FusedConvNormActHead(block, p, head)
                plain.seg_layers[-1] = torch.nn.Identity()
            else:
                blocks[i] = FusedConvNormAct(block, p)
            count += 1
    return count


class _FakeBlock:
    """A merged stage's skip convolution and its after_conv (dropout, norm, nonlin) seen as one block by ``parts``."""

    def __init__(self, conv: torch.nn.Module, after: torch.nn.Sequential):
        self.conv = conv
        self.all_modules = [conv, *after]
