"""--fuse-norms: the Triton kernels (trtseg/accel/rewrites/triton_fusion.py) and the network rewrite (trtseg/accel/rewrites/norm_fusion.py).

Without a GPU, Triton runs its kernels in its interpreter (conftest sets TRITON_INTERPRET=1), on CPU tensors: the
same kernel code, the same index arithmetic and masks. tests/test_gpu.py runs them compiled on CUDA."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton", reason="the fused kernels are Triton kernels (pip install triton)")

from trtseg.accel.rewrites import conv_fold, norm_fusion, triton_fusion, upsample_merge  # noqa: E402
from trtseg.accel.torch_engine import TorchEngine, _fp16_with_fp32_norms  # noqa: E402

CL = torch.channels_last_3d
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _half_cl(shape, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * scale).half().to(DEVICE)
    return x.contiguous(memory_format=CL) if x.dim() == 5 else x


@pytest.mark.parametrize("fold,shape,kx", [(1, (2, 16, 5, 6, 7), 1), (2, (2, 16, 5, 6, 8), 1),
                                           (2, (2, 16, 5, 6, 8), 2), (2, (2, 16, 5, 6, 8), 4)],
                         ids=["odd_width", "folded", "folded_2_taps_a_product", "folded_4_taps_a_product"])
def test_convolution_writes_its_output_and_the_norms_sums(fold, shape, kx):
    """KX x taps a matrix product read KX*CIN contiguous inputs a row: the volume's first and last x positions
    fall inside a row's run and must read as zero padding."""
    x = _half_cl(shape)
    w = _half_cl((32, 16, 3, 3, 3), 0.1, seed=1)
    bias = _half_cl((32,), seed=2)
    y, sums, squares = triton_fusion.conv3x3x3(x, triton_fusion.taps_weight(w, fold), bias, fold=fold, stats=True,
                                               config=(4, 2, 4, 1, kx))
    ref = F.conv3d(x.float(), w.float(), bias.float(), padding=1)
    assert y.dtype == torch.float16 and y.is_contiguous(memory_format=CL)
    torch.testing.assert_close(y.float(), ref, atol=5e-3 * ref.abs().max().item(), rtol=0)
    torch.testing.assert_close(sums, y.float().sum((2, 3, 4)), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(squares, (y.float() ** 2).sum((2, 3, 4)), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("fold,kx", [(1, 1), (2, 4)])
def test_convolution_adds_a_merged_upsamplings_slots(fold, kx):
    """The skip half of a merged decoder stage adds the upsampled half, given in slot order (trtseg/accel/upsample_merge)."""
    x = _half_cl((2, 16, 5, 6, 8))
    w = _half_cl((16, 16, 3, 3, 3), 0.1, seed=1)
    slots = _half_cl((2, 8 * 16, 4, 4, 5), seed=3)  # stride 2 per axis, lead 1: coarse size fine // 2 + 1
    y, sums, _ = triton_fusion.conv3x3x3(x, triton_fusion.taps_weight(w, fold), None, fold=fold, stats=True,
                                         slots=slots, slot_stride=(2, 2, 2), slot_lead=(1, 1, 1),
                                         config=(4, 2, 4, 1, kx))
    ref = F.conv3d(x.float(), w.float(), padding=1) + upsample_merge.slots_to_volume(slots.float(), (2, 2, 2),
                                                                                      (1, 1, 1), (5, 6, 8))
    torch.testing.assert_close(y.float(), ref, atol=5e-3 * ref.abs().max().item(), rtol=0)
    torch.testing.assert_close(sums, y.float().sum((2, 3, 4)), rtol=1e-4, atol=1e-3)


def test_convolution_refuses_taps_a_product_that_do_not_fit():
    x = _half_cl((1, 16, 3, 4, 6))
    taps = triton_fusion.taps_weight(_half_cl((16, 16, 3, 3, 3), seed=1), 1)
    with pytest.raises(ValueError, match="KX=3 taps a product do not fit fold 1 and 16 input channels"):
        triton_fusion.conv3x3x3(x, taps, None, fold=1, config=(4, 2, 4, 1, 3))
    assert triton_fusion.conv_config(1, 16)[4] == 1  # the default lowers KX to what fits


def test_conv_configs_from_the_environment_syntax():
    assert triton_fusion.parse_conv_configs("2/64+slots:64,2,4,3,4; 1:128,1,8,4,1;") == {
        "2/64+slots": (64, 2, 4, 3, 4), "1": (128, 1, 8, 4, 1)}
    for bad in ("2:64,2,4,3", "2=64,2,4,3,4", "2:64,2,4,0,4", "x:1,1,1,1,1", "2/64+s:1,1,1,1,1"):
        with pytest.raises(ValueError, match="is not FOLD.*:BLOCK_X,ROWS,WARPS,STAGES,KX"):
            triton_fusion.parse_conv_configs(bad)


def test_conv_config_takes_the_most_specific_entry(monkeypatch):
    table = {"2": (64, 2, 4, 4, 4), "2/64": (32, 4, 4, 3, 2), "2/64+slots": (32, 4, 8, 3, 1), "1": (128, 1, 8, 4, 3)}
    monkeypatch.setattr(triton_fusion, "CONV_CONFIGS", table)
    assert triton_fusion.conv_config(2, 64, slots=True) == (32, 4, 8, 3, 1)
    assert triton_fusion.conv_config(2, 64) == (32, 4, 4, 3, 2)
    assert triton_fusion.conv_config(2, 32, slots=True) == (64, 2, 4, 4, 4)  # no 2/32 entry: fold 2's
    assert triton_fusion.conv_config(1, 32) == (128, 1, 8, 4, 1)  # KX lowered: 3 does not fit 32 channels
    assert triton_fusion.conv_config(3, 32) == (128, 1, 8, 4, 1)  # an unknown fold takes fold 1's


@pytest.mark.parametrize("channels", [1, 2])
def test_stem_normalizes_and_activates_without_writing_the_convolution(channels):
    x = _half_cl((2, channels, 5, 6, 9))
    w = _half_cl((32, channels, 3, 3, 3), 0.3, seed=1)
    bias = _half_cl((32,), seed=2)
    gamma, beta = torch.rand(32, device=DEVICE) + 0.5, torch.randn(32, device=DEVICE)
    y = triton_fusion.stem_conv_norm_act(x, triton_fusion.stem_taps(w), bias, gamma, beta, 1e-5, 0.01,
                                         config=(8, 2, 4))
    conv = F.conv3d(x.float(), w.float(), bias.float(), padding=1).half().float()
    ref = F.leaky_relu(F.instance_norm(conv, weight=gamma, bias=beta, eps=1e-5), 0.01)
    torch.testing.assert_close(y.float(), ref, atol=2e-2, rtol=0)


def test_head_normalizes_activates_and_applies_the_1x1_convolution_in_one_pass():
    x = _half_cl((2, 32, 3, 5, 7))
    scale, shift = torch.rand(2, 32, device=DEVICE) + 0.5, torch.randn(2, 32, device=DEVICE)
    w, bias = _half_cl((3, 32, 1, 1, 1), seed=1), _half_cl((3,), seed=2)
    y = triton_fusion.norm_act_pointwise(x, scale, shift, triton_fusion.head_weight(w), bias, 3, 0.01, block=32)
    act = F.leaky_relu(x.float() * scale[:, :, None, None, None] + shift[:, :, None, None, None], 0.01)
    ref = F.conv3d(act.half().float(), w.float(), bias.float())
    assert y.shape == (2, 3, 3, 5, 7) and y.is_contiguous()  # logits in (b, class, z, y, x) order
    torch.testing.assert_close(y.float(), ref, atol=2e-2 * ref.abs().max().item(), rtol=0)


def _unet(deep_supervision=False):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    torch.manual_seed(0)
    net = PlainConvUNet(1, 2, (32, 64), torch.nn.Conv3d, 3, (1, 2), (2, 2), 3, (2,), conv_bias=True,
                        norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                        nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True},
                        deep_supervision=deep_supervision).eval()
    for m in net.modules():  # non-trivial affine norms, so that a dropped gamma or beta shows
        if isinstance(m, torch.nn.InstanceNorm3d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
    return net


def _fp16(net, merge):
    net = copy.deepcopy(net)
    merged = upsample_merge.merge_upsampling(net) if merge else 0
    conv_fold.fold_narrow_convolutions(net)
    return _fp16_with_fp32_norms(net).to(DEVICE).to(memory_format=CL), merged


@pytest.mark.parametrize("merge", [False, True], ids=["plain_decoder", "merged_decoder"])
def test_fused_network_gives_the_unfused_logits(merge):
    net = _unet()
    plain, merged = _fp16(net, merge)
    fused, _ = _fp16(net, merge)
    count = norm_fusion.fuse_norms(fused)
    kinds = sorted(type(m).__name__ for m in fused.modules() if type(m).__module__ == norm_fusion.__name__)
    # stem, the encoder's 32->32 block, the last block with the head, and in a merged decoder its skip half
    assert count == 3 + merged
    assert kinds.count("FusedStem") == 1 and kinds.count("FusedConvNormActHead") == 1
    assert kinds.count("FusedMergedStage") == merged
    x = _half_cl((2, 1, 6, 10, 14))
    with torch.no_grad():
        a, b = plain(x).float(), fused(x).float()
    assert b.shape == a.shape == (2, 3, 6, 10, 14)
    assert (b - a).abs().max() <= 0.02 * a.abs().max(), (b - a).abs().max()  # fp16 sums in another order
    assert (b.argmax(1) == a.argmax(1)).float().mean() >= 0.99


def test_deep_supervision_keeps_its_heads():
    fused, _ = _fp16(_unet(deep_supervision=True), False)
    norm_fusion.fuse_norms(fused)
    assert not any(isinstance(m, norm_fusion.FusedConvNormActHead) for m in fused.modules())
    assert all(isinstance(s, torch.nn.Conv3d) for s in fused.decoder.seg_layers)


def test_fused_blocks_fall_back_to_the_original_for_float32_input():
    net = _unet()
    fused = copy.deepcopy(net)
    norm_fusion.fuse_norms(fused)
    x = torch.randn(1, 1, 4, 6, 8)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), net(x))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_engine_refuses_fuse_norms_off_the_fp16_channels_last_cuda_path():
    with pytest.raises(ValueError, match="fuse_norms needs a CUDA device, fp16_weights and channels_last"):
        TorchEngine(_unet(), "cpu", fuse_norms=True)
