"""Width-folded convolutions: the same 3x3x3 convolution, computed with fold times the output channels.

A stride-1, padding-1, 3x3x3 convolution with Cout output channels, on a volume whose width (the last axis, x) is
divisible by f, equals a convolution with f*Cout output channels, stride f along x, a kernel f+2 wide along x and
padding 1: its output channel p*Cout + c at coarse position X is channel c at fine position x = f*X + p. Its weights
are the original ones shifted by p along x, zeros elsewhere.

Why: cuDNN runs nnU-Net's full-resolution 32->32 convolutions at about a quarter of the H100's tensor-core rate
(220 TFLOP/s, an sm80 kernel), because 32 output channels make narrow matrix tiles. Folded by 2 they do 4/3 of the
multiply-adds on tiles twice as wide: 2.13 -> 1.86 ms each for a batch of four 128^3 tiles
(``python -m benchmarks.conv_alternatives``).

In channels-last-3d memory order (b, z, y, x, c) the folded output (b, z, y, X, p*Cout + c) has the bytes of the
unfolded one (b, z, y, f*X + p, c), so unfolding is a view; in other orders it is a copy.

Values: the same products, summed in another order, so results equal the plain convolution's up to float rounding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CHANNELS_LAST = torch.channels_last_3d


def fold_weight(weight: torch.Tensor, fold: int) -> torch.Tensor:
    """(Cout, Cin, 3, 3, 3) -> (fold*Cout, Cin, 3, 3, fold+2): output channel p*Cout + c is weight c shifted by p
    along x."""
    cout, cin = weight.shape[:2]
    folded = weight.new_zeros((fold * cout, cin, 3, 3, fold + 2))
    for p in range(fold):
        folded[p * cout:(p + 1) * cout, :, :, :, p:p + 3] = weight
    return folded


def unfold_output(y: torch.Tensor, fold: int) -> torch.Tensor:
    """(b, fold*Cout, z, y, X) -> (b, Cout, z, y, fold*X); a view of a channels-last-3d tensor, else a copy."""
    b, fc, d, h, w = y.shape
    cout, x = fc // fold, w * fold
    if y.is_contiguous(memory_format=CHANNELS_LAST):
        return y.as_strided((b, cout, d, h, x), (d * h * x * cout, 1, h * x * cout, x * cout, cout))
    return y.permute(0, 2, 3, 4, 1).reshape(b, d, h, x, cout).permute(0, 4, 1, 2, 3)


def foldable(conv: torch.nn.Module) -> bool:
    return (isinstance(conv, torch.nn.Conv3d) and conv.kernel_size == (3, 3, 3) and conv.stride == (1, 1, 1)
            and conv.padding == (1, 1, 1) and conv.dilation == (1, 1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


class WidthFoldedConv3d(torch.nn.Module):
    """The same function as a foldable ``nn.Conv3d`` (kept as ``conv``), computed width-folded by ``fold``.
    An input whose width ``fold`` does not divide takes the plain convolution."""

    def __init__(self, conv: torch.nn.Conv3d, fold: int = 2):
        super().__init__()
        if not foldable(conv) or fold < 2:
            raise ValueError(f"cannot fold {conv} by {fold}: only stride-1, padding-1, ungrouped 3x3x3 convolutions "
                             "fold, by 2 or more")
        self.fold, self.conv = fold, conv
        self.folded_weight = torch.nn.Parameter(fold_weight(conv.weight.detach(), fold), requires_grad=False)
        self.folded_bias = (torch.nn.Parameter(conv.bias.detach().repeat(fold), requires_grad=False)
                            if conv.bias is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.fold:
            return self.conv(x)
        if not torch.compiler.is_compiling():  # eager: cuDNN adds the bias as it writes
            return unfold_output(F.conv3d(x, self.folded_weight, self.folded_bias, stride=(1, 1, self.fold),
                                          padding=1), self.fold)
        # compiled: Inductor splits the bias off the convolution into a pointwise add. Behind the unfolding view
        # that add is a pass of its own over the full-resolution volume (0.35 ms for four 128^3 tiles on the H100);
        # added to the unfolded view, it fuses into the next normalization's kernels, as for a plain convolution
        y = unfold_output(F.conv3d(x, self.folded_weight, None, stride=(1, 1, self.fold), padding=1), self.fold)
        return y if self.conv.bias is None else y + self.conv.bias.view(1, -1, 1, 1, 1)


def fold_narrow_convolutions(network: torch.nn.Module, channels: int = 32, fold: int = 2) -> int:
    """Replaces, in place, each foldable ``channels`` -> ``channels`` convolution of ``network`` by its width-folded
    twin (one twin per convolution, under every name the module tree gives it, e.g. nnU-Net's ``conv`` and
    ``all_modules.0``); returns how many convolutions were folded.

    Only these pay on the H100: 64->32 gains 2 % alone, and 1->32 folded is slower (benchmarks.conv_alternatives)."""
    twins: dict[int, WidthFoldedConv3d] = {}
    for module in list(network.modules()):
        for name, child in list(module._modules.items()):  # not named_children(): it skips a child's second name
            if (isinstance(child, torch.nn.Conv3d) and foldable(child)
                    and (child.in_channels, child.out_channels) == (channels, channels)):
                twins.setdefault(id(child), WidthFoldedConv3d(child, fold))
                setattr(module, name, twins[id(child)])
    return len(twins)
