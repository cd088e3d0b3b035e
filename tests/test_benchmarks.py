"""The width-folded convolution that benchmarks/conv_alternatives.py times is the same function as the plain one."""
import pytest
import torch

from benchmarks.conv_alternatives import WidthFoldedConv3d, fold_network

CL = torch.channels_last_3d


@pytest.mark.parametrize("cin,fold", [(1, 2), (3, 2), (4, 4)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_width_folded_convolution_equals_the_plain_one(cin, fold, layout):
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(cin, 5, 3, padding=1).double()
    folded = WidthFoldedConv3d(conv, fold)
    x = torch.randn(2, cin, 4, 5, 4 * fold, dtype=torch.double)
    if layout == "channels_last":
        folded, x = folded.to(memory_format=CL), x.contiguous(memory_format=CL)
    y = folded(x)
    assert y.shape == conv(x).shape
    torch.testing.assert_close(y, conv(x), rtol=1e-12, atol=1e-12)
    if layout == "channels_last":  # unfolding is a view of the folded convolution's output
        assert y._base is not None and y.is_contiguous(memory_format=CL)


def test_a_width_the_fold_does_not_divide_takes_the_plain_convolution():
    conv = torch.nn.Conv3d(2, 3, 3, padding=1).double()
    x = torch.randn(1, 2, 3, 3, 7, dtype=torch.double)
    torch.testing.assert_close(WidthFoldedConv3d(conv, 2)(x), conv(x))


def test_fold_network_replaces_each_matching_convolution_once():
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.Conv3d(4, 4, 3, padding=1),
                              torch.nn.Conv3d(4, 4, 3, padding=1, stride=2))
    net.add_module("alias", net[1])  # the same convolution reached twice, as nnU-Net's blocks do (all_modules)
    x = torch.randn(1, 1, 4, 4, 8)
    ref = net[:3](x)
    assert fold_network(net, 4, 4, 2) == 1  # the strided one is not foldable
    assert isinstance(net[1], WidthFoldedConv3d) and net.alias is net[1]
    torch.testing.assert_close(net[:3](x), ref, rtol=1e-5, atol=1e-5)
