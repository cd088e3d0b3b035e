"""The decoder's transposed convolutions merged into the convolutions after them (trtseg/accel/rewrites/upsample_merge.py) compute
the same function as nnU-Net's decoder: isotropic and anisotropic strides and kernels, with and without biases,
both memory layouts, deep supervision, eager and compiled, and through the PyTorch engine (the CLI flag:
tests/test_conv_fold.py)."""
import copy

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

from trtseg.accel.rewrites.conv_fold import WidthFoldedConv3d
from trtseg.accel.torch_engine import TorchEngine
from trtseg.accel.rewrites.upsample_merge import MergedUpsamplingDecoder, MergedUpsamplingStage, axis_phases, merge_upsampling
from trtseg import synthetic as syn
from trtseg.model_folder import load_model_folder

CL = torch.channels_last_3d


def unet(strides, kernels, features=(8, 16, 24, 32), conv_bias=True, arch=PlainConvUNet, dims=3, seed=0):
    torch.manual_seed(seed)
    conv = torch.nn.Conv3d if dims == 3 else torch.nn.Conv2d
    norm = torch.nn.InstanceNorm3d if dims == 3 else torch.nn.InstanceNorm2d
    n = len(strides)
    blocks = {"n_conv_per_stage": 2} if arch is PlainConvUNet else {"n_blocks_per_stage": 1}
    net = arch(1, n, list(features[:n]), conv, kernels, strides, num_classes=3, n_conv_per_stage_decoder=2,
               conv_bias=conv_bias, norm_op=norm, norm_op_kwargs={"eps": 1e-5, "affine": True},
               nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True}, **blocks).double().eval()
    for p in net.parameters():  # biases as large as weights: T's bias near the volume's faces must come out right
        p.data.normal_(0, 0.5)
    return net


CASES = {  # name: (strides, kernels, patch zyx)
    "isotropic": ([1, 2, 2, 2], [3, 3, 3, 3], (16, 16, 16)),
    "anisotropic, nnU-Net's (1, 3, 3) kernels": ([[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 1]],
                                                 [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 1]], (8, 16, 12)),
    "5-wide kernels": ([1, 2, 2], [5, 5, 3], (8, 8, 8)),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_merged_decoder_computes_the_same_function(case, layout):
    strides, kernels, patch = CASES[case]
    net = unet(strides, kernels)
    ref = copy.deepcopy(net)
    assert merge_upsampling(net) == len(strides) - 1
    assert isinstance(net.decoder, MergedUpsamplingDecoder)
    x = torch.randn(2, 1, *patch, dtype=torch.double)
    if layout == "channels_last":
        net, x = net.to(memory_format=CL), x.contiguous(memory_format=CL)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), rtol=1e-10, atol=1e-10)


def test_without_biases_and_with_deep_supervision():
    net = unet([1, 2, 2], [3, 3, 3], conv_bias=False)
    net.decoder.deep_supervision = True
    ref = copy.deepcopy(net)
    assert merge_upsampling(net) == 2
    assert net.decoder.merged[0].bias_channels == 0  # no channel of ones without T's bias
    x = torch.randn(1, 1, 8, 12, 8, dtype=torch.double)
    with torch.no_grad():
        out, expected = net(x), ref(x)
    assert len(out) == len(expected) == 2  # one output per decoder stage
    for a, b in zip(out, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_residual_encoder_unet_merges_too():
    net = unet([1, 2, 2], [3, 3, 3], arch=ResidualEncoderUNet)
    ref = copy.deepcopy(net)
    assert merge_upsampling(net) == 2
    x = torch.randn(1, 1, 8, 8, 8, dtype=torch.double)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), rtol=1e-10, atol=1e-10)


def test_a_2d_network_is_left_as_it_was():
    net = unet([1, 2, 2], [3, 3, 3], dims=2)
    decoder = net.decoder
    assert merge_upsampling(net) == 0 and net.decoder is decoder


def test_the_merged_convolution_does_fewer_multiply_adds():
    """For nnU-Net's stride 2 and kernel 3 the merged kernel is 2 wide: 8 taps for each of the 8 phases' channels
    on the coarse volume, against T plus 27 taps on the fine one."""
    assert axis_phases(2, 3) == (2, 1, 1)
    stage = unet([1, 2], [3, 3]).decoder
    merged = MergedUpsamplingStage(stage.transpconvs[0], stage.stages[0])
    assert merged.merged_weight.shape == (8 * 8, 16 + 8, 2, 2, 2)  # 8 phases x 8 channels; 16 + a channel of ones, 7 zeros
    assert merged.skip_conv.weight.shape == (8, 8, 3, 3, 3)


def test_compiled_merged_stage_equals_the_eager_one():
    net = unet([1, 2], [3, 3]).float()
    merged = MergedUpsamplingStage(net.decoder.transpconvs[0], net.decoder.stages[0]).eval()
    low, skip = torch.randn(1, 16, 4, 6, 4), torch.randn(1, 8, 8, 12, 8)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(merged)(low, skip), merged(low, skip), rtol=1e-4, atol=1e-4)


def model_folder(tmp_path):
    return syn.make_model_folder(str(tmp_path / "m"), folds=(0,), patch_size=(8, 16, 16), spacing=(1.0, 1.0, 1.0),
                                 features=(32, 64))


def test_engine_with_merged_upsampling_gives_the_same_logits_and_folds_the_skip_half(tmp_path):
    model = load_model_folder(model_folder(tmp_path), ["0"])
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 1, 8, 16, 16), dtype=np.float32))
    plain = TorchEngine(model.build_network("0"), "cpu", channels_last=True)
    merged = TorchEngine(model.build_network("0"), "cpu", channels_last=True, merge_upsampling=True,
                         fold_convolutions=True)
    assert merged.describe()["merged_upsamplings"] == 1
    stage = merged.network.decoder.merged[0]
    assert isinstance(stage.skip_conv, WidthFoldedConv3d)  # the full-resolution skip half is a 32->32 convolution
    assert merged.describe()["folded_convolutions"] == 3  # the encoder's, the decoder's second and that skip half
    torch.testing.assert_close(merged.infer(x), plain.infer(x), rtol=1e-4, atol=1e-4)
