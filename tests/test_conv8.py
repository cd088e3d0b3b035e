"""The 8-bit convolution kernel (trtseg/accel/rewrites/conv8.py) against the 8-bit reference (trtseg/accel/quant8.py).

Without a GPU, Triton runs the kernel in its interpreter (conftest sets TRITON_INTERPRET=1) on CPU tensors: the same
kernel code, index arithmetic, masks and epilogue. On a CUDA machine the same tests run the compiled kernel."""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton", reason="the 8-bit kernel is a Triton kernel (pip install triton)")

from trtseg.accel import quant8  # noqa: E402
from trtseg.accel.rewrites import conv8  # noqa: E402
from trtseg.accel.torch_engine import _fp16_with_fp32_norms  # noqa: E402

CL = torch.channels_last_3d
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = (32, 32, 32, 4, 1)  # BLOCK_M, BLOCK_N, BLOCK_K, warps, stages: several blocks on small volumes


def _input(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 2).half().to(DEVICE).contiguous(memory_format=CL)


def _layer(cin, cout, kernel, stride, seed=1):
    torch.manual_seed(seed)
    layer = torch.nn.Conv3d(cin, cout, kernel, stride=stride, padding=tuple(k // 2 for k in kernel))
    return layer.to(DEVICE)


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
@pytest.mark.parametrize("cin,cout,kernel,stride,size", [
    (1, 8, (3, 3, 3), (1, 1, 1), (5, 6, 7)),      # the stem: one input channel, a 32-deep block mostly masked
    (16, 20, (3, 3, 3), (2, 2, 2), (7, 6, 9)),    # strided, odd sizes, output channels not a power of two
    (40, 16, (1, 3, 3), (1, 2, 2), (3, 8, 6)),    # anisotropic kernel and stride, input channels over two blocks
], ids=["stem", "strided", "anisotropic"])
def test_kernel_computes_the_8_bit_reference(fmt, cin, cout, kernel, stride, size):
    """The kernel's output on quantized inputs equals the reference's function: int8 exactly (integer sums, then the
    same fp32 epilogue), fp8 up to the order of the fp32 sums; with the stride's output shape."""
    layer = _layer(cin, cout, kernel, stride)
    x = _input((2, cin, *size))
    scale = float(x.float().abs().max()) / quant8.FORMATS[fmt][1] * 0.8  # some inputs saturate
    taps, w_scales = conv8.tap_weights(layer.weight, fmt)
    bias = layer.bias.detach().float()
    xq = quant8.quantize(x, scale, fmt).contiguous(memory_format=CL)
    got = conv8.conv8(xq, taps, w_scales, bias, scale, kernel, stride, config=SMALL)
    with torch.no_grad():
        want_shape = layer(x.float()).shape
    assert got.shape == want_shape and got.dtype == torch.float16 and got.is_contiguous(memory_format=CL)
    # the reference: quantized input and weights as quant8 defines them; their products summed exactly in float64
    wq = quant8.quantize(layer.weight.detach().float(), quant8.weight_scales(layer.weight, fmt), fmt).double()
    sums = F.conv3d(xq.double(), wq, None, stride, layer.padding)
    want = (sums.float() * (torch.tensor(scale, dtype=torch.float32) * w_scales).view(1, -1, 1, 1, 1)
            + bias.view(1, -1, 1, 1, 1)).half()
    if fmt == "int8" and DEVICE == "cpu":
        assert torch.equal(got, want)
    else:  # fp32 sums in the kernel's order (and, compiled, contracted multiply-adds)
        assert (got.float() - want.float()).abs().max() <= 2e-3 * want.float().abs().max()
    # and the reference module computes the same function in float32
    ref = quant8.QuantConv(layer, scale, fmt)(x.float())
    assert (got.float() - ref).abs().max() <= 2e-3 * ref.abs().max()


class _Net(torch.nn.Module):
    """Strided encoder convolutions with InstanceNorm + LeakyReLU, a transposed convolution and a 1x1x1 head."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv3d(1, 8, 3, padding=1)
        self.n1 = torch.nn.InstanceNorm3d(8, affine=True)
        self.down = torch.nn.Conv3d(8, 16, 3, stride=2, padding=1)
        self.n2 = torch.nn.InstanceNorm3d(16, affine=True)
        self.up = torch.nn.ConvTranspose3d(16, 8, 2, stride=2)
        self.seg_layers = torch.nn.ModuleList([torch.nn.Conv3d(8, 3, 1)])

    def forward(self, x):
        a = F.leaky_relu(self.n1(self.stem(x)), 0.01)
        b = F.leaky_relu(self.n2(self.down(a)), 0.01)
        return self.seg_layers[0](self.up(b) + a)


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_network_with_8_bit_kernels_gives_the_reference_networks_masks(fmt):
    """Calibrated on patches, the fp16 channels-last network with its convolutions on the 8-bit kernel gives the
    masks of quant8's reference network (float32) on other patches; the transposed convolution and the head stay as
    they were."""
    torch.manual_seed(0)
    net = _Net().eval()
    patches = torch.randn(3, 1, 8, 12, 12)
    scales = quant8.calibrate(net, patches, fmt, "percentile")
    assert set(scales) == {"stem", "down", "up"}
    reference = quant8.quantize_network(net, scales, fmt)
    fast = _fp16_with_fp32_norms(copy.deepcopy(net)).to(DEVICE).to(memory_format=CL)
    replaced = conv8.quantize_convolutions(fast, scales, fmt)
    assert replaced == ["stem", "down"]
    fast = fast.to(memory_format=CL)  # a conversion after the rewrite leaves the 8-bit weights alone
    taps_dtype = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}[fmt]
    assert fast.stem.taps.dtype == taps_dtype and fast.stem.weight_scales.dtype == torch.float32
    x = torch.randn(2, 1, 8, 12, 12)
    with torch.no_grad():
        want = reference(x)
        got = fast(x.half().to(DEVICE).contiguous(memory_format=CL)).float().cpu()
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 0.02 * want.abs().max()  # fp16 weights and activations between the layers
    assert (got.argmax(1) == want.argmax(1)).float().mean() >= 0.99


def test_layers_off_the_kernels_path_run_the_reference():
    """A float32 input (a CPU engine) runs quant8.QuantConv's function; unsupported layers are refused."""
    layer = torch.nn.Conv3d(4, 6, 3, padding=1)
    m = conv8.Conv8(layer, 0.05, "fp8")
    x = torch.randn(1, 4, 5, 5, 5)
    assert not m.kernel_runs(x)
    assert torch.equal(m(x), quant8.QuantConv(layer, 0.05, "fp8")(x))
    m.half()  # a module conversion leaves the 8-bit weights, their fp32 scales and the reference as they are
    assert m.taps.dtype == torch.float8_e4m3fn and m.weight_scales.dtype == torch.float32
    assert torch.equal(m(x), quant8.QuantConv(layer, 0.05, "fp8")(x))
    for other in (torch.nn.Conv3d(4, 6, 3, padding=0), torch.nn.Conv3d(4, 6, 3, padding=1, dilation=2),
                  torch.nn.Conv3d(4, 4, 3, padding=1, groups=2), torch.nn.ConvTranspose3d(4, 6, 2, stride=2)):
        assert not conv8.supports(other)
    with pytest.raises(ValueError, match="not a convolution the 8-bit kernel computes"):
        conv8.Conv8(torch.nn.Conv3d(4, 6, 3), 0.05, "fp8")


def test_launch_configurations_from_the_environment_syntax():
    assert conv8.parse_configs("32/32/1:128,32,32,4,3; *:64,64,64,8,2") == {
        "32/32/1": (128, 32, 32, 4, 3), "*": (64, 64, 64, 8, 2)}
    for bad in ("32/32:128,32,32,4,3", "*:128,48,32,4,3", "*:128,32,32,4"):
        with pytest.raises(ValueError, match="TRTSEG_CONV8_CONFIGS"):
            conv8.parse_configs(bad)
    x = torch.zeros(1, 4, 3, 3, 3).to(torch.int8).contiguous(memory_format=CL)
    taps, scales = conv8.tap_weights(torch.ones(2, 4, 3, 3, 3), "fp8")
    with pytest.raises(ValueError, match="int8 input with torch.float8_e4m3fn weights"):
        conv8.conv8(x, taps, scales, None, 1.0, (3, 3, 3), (1, 1, 1))
    with pytest.raises(ValueError, match="fp8 or int8 channels-last-3d input"):
        conv8.conv8(x.half(), taps, scales, None, 1.0, (3, 3, 3), (1, 1, 1))
    assert conv8.config_for(1, 8, 1)[1:3] == (32, 32)  # no wider than the layer's channels need


def test_network_rewrite_reaches_the_convolutions_nnunet_blocks_call(small_model):
    """nnU-Net's blocks call their convolution through an all_modules Sequential: every replaced layer runs the
    8-bit module on the forward pass, and the network's masks are the reference network's."""
    from trtseg.model_folder import load_model_folder

    model = load_model_folder(small_model, ["0"])
    net = model.build_network("0").eval()
    patch = [min(s, 16) for s in model.patch_size]
    scales = quant8.calibrate(net, torch.randn(2, 1, *patch), "int8", "minmax")
    fast = _fp16_with_fp32_norms(copy.deepcopy(net)).to(DEVICE).to(memory_format=CL)
    replaced = conv8.quantize_convolutions(fast, scales, "int8")
    ran = []
    for m in fast.modules():
        if isinstance(m, conv8.Conv8):
            m.register_forward_hook(lambda *_: ran.append(1))
    x = torch.randn(1, 1, *patch)
    with torch.no_grad():
        got = fast(x.half().to(DEVICE).contiguous(memory_format=CL)).float().cpu()
        want = quant8.quantize_network(net, scales, "int8")(x)
    assert len(replaced) > 4 and len(ran) == len(replaced)
    # fp16 activations between the layers move some values across a quantization step of this small random
    # network, so its masks are close to the float32 reference's, not equal (each layer alone is exact, above): 0.971
    assert (got.argmax(1) == want.argmax(1)).float().mean() >= 0.95


_COMPILE = """
import sys, triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from trtseg.accel.rewrites import conv8
for fmt, cin, cout, stride, (bm, bn, bk, warps, stages) in [("fp8", 1, 32, 1, (128, 32, 32, 4, 3)),
        ("int8", 1, 32, 1, (128, 32, 32, 4, 3)), ("fp8", 32, 64, 2, (128, 64, 32, 8, 3)),
        ("int8", 320, 320, 1, (64, 64, 64, 4, 4))]:
    ptr = {"fp8": "*fp8e4nv", "int8": "*i8"}[fmt]
    consts = dict(CIN=cin, COUT=cout, KZ=3, KY=3, KX=3, SZ=stride, SY=stride, SX=stride, FMT=conv8.FMT_CODES[fmt],
                  HAS_BIAS=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, STAGES=stages)
    sig = {"x_ptr": ptr, "w_ptr": ptr, "wscale_ptr": "*fp32", "bias_ptr": "*fp32", "y_ptr": "*fp16",
           "in_scale": "fp32", **{a: "i32" for a in ("M", "D", "H", "W", "OD", "OH", "OW")},
           **{c: "constexpr" for c in consts}}
    kernel = triton.compile(ASTSource(fn=conv8._conv8_kernel, signature=sig, constexprs=consts),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    print(fmt, cin, cout, "wgmma" in kernel.asm["ptx"])
"""


def test_kernel_compiles_for_hopper_without_a_gpu():
    """Triton compiles the kernel for sm_90 (an H100/H200) on a machine without a GPU, through PTX and ptxas: both
    formats, the stem's single input channel, a strided layer and 320 channels, each on Hopper's warp-group matrix
    instructions, with the Triton installed. (Triton 3.6, torch 2.11's, refused int8 products summed into an int32
    accumulator without out_dtype, which the interpreter and Triton 3.9 accept.)"""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True, env=env, timeout=600)
    if r.returncode != 0 and "backend" in r.stderr.lower() and "cuda" in r.stderr.lower():
        pytest.skip("this Triton has no CUDA backend")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["fp8", "1", "32", "True", "int8", "1", "32", "True", "fp8", "32", "64", "True",
                                "int8", "320", "320", "True"]


def test_compiled_network_quantizes_inside_the_kernels_that_produce_the_activations(small_model):
    """Under torch.compile, Inductor computes each 8-bit convolution's input quantization in the kernel that produces
    that input (InstanceNorm + LeakyReLU, or the decoder's concatenation), which writes one byte a value: no pass over
    memory of its own, except for the network's input. Inductor's CPU code, with the kernel in Triton's interpreter;
    its fusion decisions are made above the backend, and the GPU's are for a GPU run to confirm. The compiled
    network's masks stay as close to the float32 reference network's as the eager network's do."""
    import re

    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    from trtseg.model_folder import load_model_folder

    model = load_model_folder(small_model, ["0"])
    net = model.build_network("0").eval()
    patch = [8, 8, 8]  # three stages down to 2x2x2; small, since Triton's interpreter runs each 8-bit layer
    scales = quant8.calibrate(net, torch.randn(2, 1, *patch), "fp8", "percentile")
    fast = _fp16_with_fp32_norms(copy.deepcopy(net)).to(DEVICE).to(memory_format=CL)
    replaced = conv8.quantize_convolutions(fast, scales, "fp8")
    x = torch.randn(1, 1, *patch).half().to(DEVICE).contiguous(memory_format=CL)
    torch._dynamo.reset()
    with torch.inference_mode(), inductor_config.patch(force_disable_caches=True):
        got, codes = run_and_get_code(torch.compile(fast, dynamic=False), x)
        want = fast(x)
    code = "\n".join(codes)
    # Inductor names a kernel after the aten ops it computes, and lists its arguments' types where it defines it
    kernels = dict(re.findall(r"^(\w+_fused_\w+) = async_compile\.\w+\((.*)$", code, re.M))
    quantizing = [name for name, args in kernels.items() if "Float8_e4m3fn*" in args]
    producers = [name for name in quantizing if "leaky_relu" in name]
    assert len(code.split("torch.ops.trtseg.conv8.default(")) - 1 == len(replaced) > 4  # every layer compiled in
    assert len(producers) == len(quantizing) - 1, kernels  # all but the network input's quantization
    assert any("batch_norm" in name for name in producers) and any("cat" in name for name in producers), producers
    reference = quant8.quantize_network(net, scales, "fp8")(x.float().cpu())
    agree = [float((y.float().cpu().argmax(1) == reference.argmax(1)).float().mean()) for y in (got, want)]
    assert min(agree) >= 0.95, agree
