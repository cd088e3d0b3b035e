"""Width-folded convolutions (trtseg/accel/rewrites/conv_fold.py) compute the same function as the plain ones, eager and compiled,
alone and inside an nnU-Net network run by the PyTorch engine; the CLI flags of both network rewrites (this one and
trtseg/accel/rewrites/upsample_merge.py) reach the engine."""
import numpy as np
import pytest
import torch

from trtseg.accel.rewrites.conv_fold import WidthFoldedConv3d, fold_narrow_convolutions
from trtseg.accel.torch_engine import TorchEngine
from trtseg import synthetic as syn
from trtseg.model_folder import load_model_folder

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


def test_compiled_folded_convolution_adds_the_bias_after_unfolding_and_still_equals_the_plain_one():
    torch.manual_seed(1)
    conv = torch.nn.Conv3d(4, 4, 3, padding=1)
    conv.bias.data.uniform_(-3, 3)  # a bias large enough that leaving it out would show
    folded = WidthFoldedConv3d(conv, 2).to(memory_format=CL)
    x = torch.randn(1, 4, 3, 4, 6).contiguous(memory_format=CL)
    torch.testing.assert_close(torch.compile(folded)(x), conv(x), rtol=1e-5, atol=1e-5)


def test_a_width_the_fold_does_not_divide_takes_the_plain_convolution():
    conv = torch.nn.Conv3d(2, 3, 3, padding=1).double()
    x = torch.randn(1, 2, 3, 3, 7, dtype=torch.double)
    torch.testing.assert_close(WidthFoldedConv3d(conv, 2)(x), conv(x))


def test_only_stride_1_padding_1_3x3x3_convolutions_fold():
    for conv in (torch.nn.Conv3d(2, 2, 3, padding=1, stride=2), torch.nn.Conv3d(2, 2, 1),
                 torch.nn.Conv3d(2, 2, 3, padding=1, groups=2)):
        with pytest.raises(ValueError, match="cannot fold"):
            WidthFoldedConv3d(conv, 2)


def test_fold_narrow_convolutions_replaces_each_32_channel_convolution_once():
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 32, 3, padding=1), torch.nn.Conv3d(32, 32, 3, padding=1),
                              torch.nn.Conv3d(32, 32, 3, padding=1, stride=2), torch.nn.Conv3d(32, 64, 3, padding=1))
    net.add_module("alias", net[1])  # one convolution under two names, as nnU-Net's conv and all_modules.0
    x = torch.randn(1, 1, 4, 4, 8)
    ref = net[:4](x)
    assert fold_narrow_convolutions(net) == 1  # 1->32, the strided one and 32->64 stay
    assert isinstance(net[1], WidthFoldedConv3d) and net.alias is net[1]
    torch.testing.assert_close(net[:4](x), ref, rtol=1e-5, atol=1e-5)


def test_engine_with_folded_convolutions_gives_the_same_logits(tmp_path):
    folder = syn.make_model_folder(str(tmp_path / "m"), folds=(0,), patch_size=(8, 16, 16), spacing=(1.0, 1.0, 1.0),
                                   features=(32, 64))
    model = load_model_folder(folder, ["0"])
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 1, 8, 16, 16), dtype=np.float32))
    plain = TorchEngine(model.build_network("0"), "cpu", channels_last=True)
    folded = TorchEngine(model.build_network("0"), "cpu", channels_last=True, fold_convolutions=True)
    assert folded.describe()["folded_convolutions"] == 2  # the encoder's and the decoder's full-resolution 32->32
    torch.testing.assert_close(folded.infer(x), plain.infer(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("flag,described,count", [
    ("--fold-convolutions", "folded_convolutions", 2),
    ("--merge-upsampling", "merged_upsamplings", 1)])  # trtseg/accel/rewrites/upsample_merge.py
def test_network_rewrite_flags_reach_the_engine(tmp_path, flag, described, count):
    from trtseg.cli import _predict_parser
    from trtseg.options import settings_from_args
    from trtseg.predict import Predictor
    folder = syn.make_model_folder(str(tmp_path / "m"), folds=(0,), patch_size=(8, 16, 16), spacing=(1.0, 1.0, 1.0),
                                   features=(32, 64))
    args = _predict_parser().parse_args(["-i", "in", "-o", "out", "-m", folder, "--engine", "torch", "--device", "cpu",
                                         flag])
    settings = settings_from_args(args)
    assert settings.engine.rewrites == {flag.lstrip("-")}
    engine = Predictor(load_model_folder(folder, ["0"]), settings).engines[0]
    assert engine.describe()[described] == count
