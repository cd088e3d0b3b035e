"""nnU-Net v1's network, Generic_UNet, as nnUNetTrainerV2 builds it: a project module, so v1 models run without the
unmaintained `nnunet` package.

Only what a trained v1 3-D model needs at inference is here: convolutional pooling (strided first convolutions),
transposed-convolution upsampling, InstanceNorm (eps 1e-5, affine), LeakyReLU(0.01), no dropout, and the last
segmentation head (deep supervision off). Module and parameter names are v1's, so a v1 checkpoint's state_dict
loads as it is: conv_blocks_context[d].blocks[i].{conv,instnorm}, the bottleneck and each
conv_blocks_localization[u] as a Sequential of two stacks, tu[u] (ConvTranspose3d without bias), seg_outputs[u]
(1x1x1 convolution without bias).

Features: base_num_features * 2**d, capped at 320 (v1's MAX_NUM_FILTERS_3D); the bottleneck has the cap's width.
Input (b, c, z, y, x) float; output (b, num_classes, z, y, x) logits (v1 applies softmax later, at aggregation).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

MAX_NUM_FILTERS_3D = 320


def _t3(v: Sequence[int] | int) -> tuple[int, int, int]:
    a, b, c = (v, v, v) if isinstance(v, int) else (int(x) for x in v)
    return a, b, c


class ConvNormNonlin(nn.Module):
    """conv -> InstanceNorm3d -> LeakyReLU, named as v1's ConvDropoutNormNonlin (its dropout has p = 0)."""

    def __init__(self, cin: int, cout: int, kernel: Sequence[int], stride: Sequence[int] | int = 1):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, _t3(kernel), _t3(stride), _t3([1 if k == 3 else 0 for k in kernel]), bias=True)
        self.instnorm = nn.InstanceNorm3d(cout, eps=1e-5, affine=True, momentum=0.1)
        self.lrelu = nn.LeakyReLU(negative_slope=1e-2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lrelu(self.instnorm(self.conv(x)))


class StackedConvLayers(nn.Module):
    """``num_convs`` ConvNormNonlin in ``blocks``; the first has ``first_stride`` (convolutional pooling)."""

    def __init__(self, cin: int, cout: int, num_convs: int, kernel: Sequence[int],
                 first_stride: Sequence[int] | None = None):
        super().__init__()
        self.output_channels = cout
        self.blocks = nn.Sequential(*[ConvNormNonlin(cin if i == 0 else cout, cout, kernel,
                                                     first_stride if (i == 0 and first_stride is not None) else 1)
                                      for i in range(num_convs)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class GenericUNet(nn.Module):
    """nnU-Net v1's Generic_UNet (3-D, as nnUNetTrainerV2 configures it), deep supervision off.

    input_channels: modalities; base_num_features: plans['base_num_features'] (32 by default)
    num_classes: plans['num_classes'] + 1 (background)
    pool_op_kernel_sizes: per downsampling step, (z, y, x) strides; conv_kernel_sizes: per resolution, one more
    conv_per_stage: plans['conv_per_stage'] (2 by default)
    """

    def __init__(self, input_channels: int, base_num_features: int, num_classes: int,
                 pool_op_kernel_sizes: Sequence[Sequence[int]], conv_kernel_sizes: Sequence[Sequence[int]],
                 conv_per_stage: int = 2, max_num_features: int = MAX_NUM_FILTERS_3D):
        super().__init__()
        pools = [tuple(int(v) for v in p) for p in pool_op_kernel_sizes]
        kernels = [tuple(int(v) for v in k) for k in conv_kernel_sizes]
        num_pool = len(pools)
        if len(kernels) != num_pool + 1:
            raise ValueError(f"{len(kernels)} conv kernel sizes for {num_pool} poolings; v1 plans have one more")
        context: list[nn.Module] = []
        cin, cout = input_channels, base_num_features
        for d in range(num_pool):
            context.append(StackedConvLayers(cin, cout, conv_per_stage, kernels[d], pools[d - 1] if d else None))
            cin, cout = cout, min(int(round(cout * 2)), max_num_features)
        bottleneck_out = cout  # convolutional upsampling: the bottleneck keeps its own width
        context.append(nn.Sequential(StackedConvLayers(cin, cout, conv_per_stage - 1, kernels[num_pool], pools[-1]),
                                     StackedConvLayers(cout, bottleneck_out, 1, kernels[num_pool])))
        self.conv_blocks_context = nn.ModuleList(context)
        self.td = nn.ModuleList()  # v1 keeps an empty list here with convolutional pooling
        tu, local, seg = [], [], []
        down = bottleneck_out
        for u in range(num_pool):
            skip = self._channels(context[-(2 + u)])
            tu.append(nn.ConvTranspose3d(down, skip, _t3(pools[-(u + 1)]), _t3(pools[-(u + 1)]), bias=False))
            kernel = kernels[-(u + 1)]
            local.append(nn.Sequential(StackedConvLayers(2 * skip, skip, conv_per_stage - 1, kernel),
                                       StackedConvLayers(skip, skip, 1, kernel)))
            seg.append(nn.Conv3d(skip, num_classes, 1, 1, 0, 1, 1, bias=False))
            down = skip
        self.tu = nn.ModuleList(tu)
        self.conv_blocks_localization = nn.ModuleList(local)
        self.seg_outputs = nn.ModuleList(seg)

    @staticmethod
    def _channels(block: nn.Module) -> int:
        return block[-1].output_channels if isinstance(block, nn.Sequential) else block.output_channels  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.conv_blocks_context[:-1]:
            x = block(x)
            skips.append(x)
        x = self.conv_blocks_context[-1](x)
        for u, (up, local) in enumerate(zip(self.tu, self.conv_blocks_localization)):
            x = local(torch.cat((up(x), skips[-(u + 1)]), dim=1))
        return self.seg_outputs[-1](x)
