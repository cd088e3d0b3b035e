"""8-bit convolutions on CUDA tensor cores: Triton kernels that run a calibrated convolution on fp8 (e4m3) or int8
inputs and weights (``--precision fp8|int8``'s kernels; the formats, scales and calibration are
``trtseg.accel.quant8``'s).

Why Triton: PyTorch exposes 8-bit matrix products (``torch._scaled_mm``, ``torch._int_mm``) but no 8-bit
convolution, and TensorRT, whose INT8 convolutions NVIDIA's MLPerf 3D-UNet entry uses, does not run everywhere trtseg
does. An im2col copy for ``_scaled_mm`` would write each 128^3 x 32 activation 27 times (1.8 GB per patch at full
resolution), so the convolution is an implicit matrix product: each program computes BLOCK_M output voxels by
BLOCK_N output channels, gathering its inputs tap by tap from the channels-last-3d volume.

Where the quantization happens: in the kernel that produces the activation. ``Conv8`` quantizes its fp16 input with
torch's elementwise ops (``quant8.quantize``: divided by the layer's calibrated input scale, saturated, int8 rounded
half to even), which torch.compile's Inductor can fuse into the kernel before (the normalization and LeakyReLU, or
the decoder's concatenation); that kernel then writes one byte a value besides or instead of two, and no pass is
added. Quantizing as the convolution loads its input was not kept: each input value is loaded once per tap (27 times),
and rounding it each time would cost the SM's arithmetic units several times the 8-bit matrix product's time. The
activations stay fp16 where the normalizations read them, and the normalizations stay in fp32
(``trtseg.accel.torch_engine._Fp32Norm``). Weights are quantized once, one scale per output channel. The epilogue
multiplies the fp32 (fp8) or int32 (int8) sums by input scale x weight scale, adds the bias and writes fp16.

Which layers: 3-D convolutions with groups 1, dilation 1 and zero padding kernel//2 (nnU-Net's 3x3x3 and
anisotropic 1x3x3 convolutions, any stride), except the segmentation head (``quant8.quantizable_layers``).
Transposed convolutions stay in the engine's fp16: cuDNN's fp16 convolution of their 8-bit values would overflow
(products up to 448^2), this kernel does not compute them, and they are a few percent of the network's
multiply-adds.

Values: the products of 8-bit values are exact in the fp32 (fp8) and int32 (int8) accumulators, so a layer computes
``quant8.QuantConv``'s function up to the order of its fp32 sums (int8: exactly, up to the epilogue's rounding).
``tests/test_conv8.py`` checks that in Triton's interpreter on the CPU.

Not yet measured on a GPU: which tile configurations are fastest (``CONV8_CONFIGS``), whether Inductor fuses the
quantization into the producing kernels as intended, and whether the network beats the fp16 engine (``python -m
benchmarks.conv8_throughput``).
"""
from __future__ import annotations

import os
import re

import torch

from trtseg.accel import quant8
from trtseg.accel.rewrites import triton_fusion
from trtseg.accel.rewrites.triton_fusion import parse_launch_configs

try:  # Triton ships with CUDA builds of PyTorch; CPU machines run the reference (quant8.QuantConv)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without Triton
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]

CHANNELS_LAST = torch.channels_last_3d
FMT_CODES = {"fp8": 0, "int8": 1}

if triton is not None:
    @triton.jit
    def _conv8_kernel(x_ptr, w_ptr, wscale_ptr, bias_ptr, y_ptr, in_scale, M, D, H, W, OD, OH, OW,
                      CIN: tl.constexpr, COUT: tl.constexpr, KZ: tl.constexpr, KY: tl.constexpr,
                      KX: tl.constexpr, SZ: tl.constexpr, SY: tl.constexpr, SX: tl.constexpr, FMT: tl.constexpr,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
        """Program (voxel block, channel block): y[m, n] for BLOCK_M output voxels m (b, oz, oy, ox flattened) and
        BLOCK_N output channels n, from the 8-bit input x (FMT 0: fp8 e4m3, 1: int8). Depth: KZ*KY*KX taps, each
        CIN channels in blocks of BLOCK_K (the weights' columns tap*CIN + c, zero past CIN); padding KZ//2, KY//2,
        KX//2."""
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ox = m % OW
        t = m // OW
        oy = t % OH
        t = t // OH
        oz = t % OD
        b = t // OD
        k = tl.arange(0, BLOCK_K)
        CBLOCKS: tl.constexpr = (CIN + BLOCK_K - 1) // BLOCK_K
        if FMT == 0:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for step in tl.range(0, KZ * KY * KX * CBLOCKS, num_stages=STAGES):
            tap = step // CBLOCKS
            c = (step % CBLOCKS) * BLOCK_K + k
            iz = oz * SZ + tap // (KY * KX) - KZ // 2
            iy = oy * SY + (tap // KX) % KY - KY // 2
            ix = ox * SX + tap % KX - KX // 2
            ok = (m < M) & (iz >= 0) & (iz < D) & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            row = ((b * D + iz).to(tl.int64) * H + iy) * W + ix
            a = tl.load(x_ptr + row[:, None] * CIN + c[None, :], mask=ok[:, None] & (c < CIN)[None, :], other=0.0)
            w = tl.load(w_ptr + n[None, :] * (KZ * KY * KX * CIN) + (tap * CIN + c)[:, None],
                        mask=(c < CIN)[:, None] & (n < COUT)[None, :], other=0.0)
            acc = tl.dot(a, w, acc, out_dtype=acc.dtype)  # int8: int32 sums (fp32 is the default)
        out = acc.to(tl.float32) * (in_scale * tl.load(wscale_ptr + n, mask=n < COUT, other=0.0))[None, :]
        if HAS_BIAS:
            out += tl.load(bias_ptr + n, mask=n < COUT, other=0.0)[None, :]
        tl.store(y_ptr + m.to(tl.int64)[:, None] * COUT + n[None, :], out.to(tl.float16),
                 mask=(m < M)[:, None] & (n < COUT)[None, :])


def available() -> bool:
    return triton is not None


def supports(layer: torch.nn.Module) -> bool:
    """Whether ``layer`` is a convolution the kernel computes: Conv3d, groups 1, dilation 1, zero padding kernel//2
    along each axis (nnU-Net's 'same' convolutions, strided or not)."""
    return (isinstance(layer, torch.nn.Conv3d) and layer.groups == 1 and tuple(layer.dilation) == (1, 1, 1)
            and layer.padding_mode == "zeros" and not isinstance(layer.padding, str)
            and tuple(layer.padding) == tuple(k // 2 for k in layer.kernel_size))


def tap_weights(weight: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(COUT, CIN, KZ, KY, KX) float -> (COUT, taps*CIN) in ``fmt`` (column tap*CIN + c, tap = (dz*KY + dy)*KX + dx)
    and the per-output-channel scales (COUT,) float32 (``quant8.weight_scales``). Each output channel's weights are
    contiguous along the product's depth: the order Hopper's 8-bit matrix instructions take the second operand in
    (Triton's fp8 matrix-multiplication tutorial transposes it so)."""
    w = weight.detach().float()
    scales = quant8.weight_scales(w, fmt, 0)
    q = quant8.quantize(w, scales, fmt)  # (COUT, CIN, KZ, KY, KX)
    cout = w.shape[0]
    taps = q.permute(0, 2, 3, 4, 1).reshape(cout, -1).contiguous()
    return taps, scales.reshape(cout).contiguous()


# launch configurations: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, pipeline stages), keyed "CIN/COUT/STRIDE" (STRIDE
# the largest stride) or "*"; the most specific present wins. Not yet tuned on a GPU: `python -m
# benchmarks.conv8_throughput` times each of the network's shapes against a few of them and prints the fastest, and
# TRTSEG_CONV8_CONFIGS="32/32/1:128,32,32,4,3;*:128,64,64,8,3" replaces or adds entries, read at the first launch.
CONV8_CONFIGS: dict[str, tuple[int, int, int, int, int]] = {"*": (128, 64, 64, 4, 3)}
_ENV_READ = False
_KEY = re.compile(r"^(\*|[0-9]+/[0-9]+/[0-9]+)$")


def parse_configs(text: str) -> dict[str, tuple[int, int, int, int, int]]:
    """"KEY:BLOCK_M,BLOCK_N,BLOCK_K,WARPS,STAGES;..." -> {key: config}; a malformed entry is refused with the
    reason."""
    return parse_launch_configs(text, "TRTSEG_CONV8_CONFIGS", _KEY, "CIN/COUT/STRIDE:BLOCK_M,BLOCK_N,BLOCK_K,WARPS,"
                                "STAGES or *:... (positive integers, the blocks powers of two)",
                                powers_of_two=3)  # type: ignore[return-value]


def config_for(cin: int, cout: int, stride: int) -> tuple[int, int, int, int, int]:
    """The ``CONV8_CONFIGS`` entry for this shape, ``narrowed`` to its channels."""
    global _ENV_READ
    if not _ENV_READ:
        CONV8_CONFIGS.update(parse_configs(os.environ.get("TRTSEG_CONV8_CONFIGS", "")))
        _ENV_READ = True
    return narrowed(CONV8_CONFIGS.get(f"{cin}/{cout}/{stride}", CONV8_CONFIGS["*"]), cin, cout)


def narrowed(config: tuple[int, ...], cin: int, cout: int) -> tuple[int, int, int, int, int]:
    """``config`` with BLOCK_N and BLOCK_K no wider than the next power of two of COUT and CIN (at least 32: 8-bit
    tensor-core products are 32 deep)."""
    block_m, block_n, block_k, warps, stages = config
    return (block_m, min(block_n, max(32, triton.next_power_of_2(cout))),
            min(block_k, max(32, triton.next_power_of_2(cin))), warps, stages)


def output_size(size, kernel, stride) -> tuple[int, ...]:
    """(z', y', x') of a convolution with zero padding kernel//2 and ``stride`` over ``size`` (z, y, x)."""
    return tuple((n + 2 * (k // 2) - k) // s + 1 for n, k, s in zip(size, kernel, stride))


def conv8(xq: torch.Tensor, taps: torch.Tensor, weight_scales: torch.Tensor, bias: torch.Tensor | None,
          input_scale: float, kernel: tuple[int, int, int], stride: tuple[int, int, int],
          config: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """The convolution of the 8-bit input ``xq`` (b, CIN, z, y, x) channels-last-3d, fp8 e4m3 or int8 as
    ``quant8.quantize(x, input_scale, fmt)`` made it, by ``taps`` of the same format (``tap_weights``), with zero
    padding kernel//2 and ``stride``; + ``bias`` (COUT,) fp32. Returns (b, COUT, z', y', x') fp16 channels-last-3d.
    config: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, stages); by default ``config_for``."""
    fmt = next((f for f, (dtype, _) in quant8.FORMATS.items() if dtype == xq.dtype), None)
    if fmt is None or xq.dim() != 5 or not xq.is_contiguous(memory_format=CHANNELS_LAST):
        raise ValueError(f"conv8: want a 5-d fp8 or int8 channels-last-3d input, got {xq.dtype} "
                         f"{tuple(xq.shape)} strides {xq.stride()}")
    if taps.dtype != xq.dtype:
        raise ValueError(f"conv8: {xq.dtype} input with {taps.dtype} weights")
    b, cin, d, h, w = xq.shape
    kz, ky, kx = kernel
    sz, sy, sx = stride
    cout = taps.shape[0]
    if taps.shape[1] != kz * ky * kx * cin:
        raise ValueError(f"conv8: {taps.shape[1]} weights a channel for a {kernel} kernel over {cin} input channels")
    od, oh, ow = output_size((d, h, w), kernel, stride)
    y = torch.empty((b, cout, od, oh, ow), device=xq.device, dtype=torch.float16, memory_format=CHANNELS_LAST)
    m = b * od * oh * ow
    block_m, block_n, block_k, warps, stages = config or config_for(cin, cout, max(stride))
    grid = (triton.cdiv(m, block_m), triton.cdiv(cout, block_n))
    _conv8_kernel[grid](xq, taps, weight_scales, bias if bias is not None else weight_scales, y, float(input_scale),
                        m, d, h, w, od, oh, ow, CIN=cin, COUT=cout, KZ=kz, KY=ky, KX=kx, SZ=sz, SY=sy, SX=sx,
                        FMT=FMT_CODES[fmt], HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n,
                        BLOCK_K=block_k, STAGES=stages, num_warps=warps)
    return y


# a custom op: opaque to torch.compile, which compiles the normalizations and activations around it
@torch.library.custom_op("trtseg::conv8", mutates_args=())
def _conv8_op(xq: torch.Tensor, taps: torch.Tensor, weight_scales: torch.Tensor, bias: torch.Tensor | None,
              input_scale: float, kernel: list[int], stride: list[int]) -> torch.Tensor:
    return conv8(xq, taps, weight_scales, bias, input_scale, tuple(kernel), tuple(stride))  # type: ignore[arg-type]


@_conv8_op.register_fake
def _(x, taps, weight_scales, bias, input_scale, kernel, stride):
    return torch.empty((x.shape[0], taps.shape[0], *output_size(x.shape[2:], kernel, stride)), device=x.device, dtype=torch.float16, memory_format=CHANNELS_LAST)


class Conv8(torch.nn.Module):
    """A convolution run by the 8-bit kernel on fp16 channels-last CUDA inputs (or any input, in Triton's
    interpreter); other inputs run ``quant8.QuantConv``'s reference, the same function in float32.

    Its 8-bit weights, scales, bias and reference are plain attributes, not buffers, parameters or submodules: the
    engine's later conversions (``.half()``, channels-last) must not touch them; ``_apply`` moves them to the device
    of a one-byte buffer, which device moves carry and dtype conversions leave alone."""

    def __init__(self, layer: torch.nn.Conv3d, input_scale: float, fmt: str):
        super().__init__()
        if not supports(layer):
            raise ValueError(f"Conv8: {layer} is not a convolution the 8-bit kernel computes")
        self.fmt, self.input_scale = fmt, float(input_scale)
        self.kernel = tuple(int(k) for k in layer.kernel_size)
        self.stride = tuple(int(s) for s in layer.stride)
        self.register_buffer("_where", torch.zeros(1, dtype=torch.uint8, device=layer.weight.device),
                             persistent=False)
        self.taps, self.weight_scales = tap_weights(layer.weight, fmt)
        self.bias = None if layer.bias is None else layer.bias.detach().float().contiguous()
        object.__setattr__(self, "reference", quant8.QuantConv(layer, input_scale, fmt))

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        device = self._where.device
        self.taps, self.weight_scales = self.taps.to(device), self.weight_scales.to(device)
        self.bias = self.bias.to(device) if self.bias is not None else None
        self.reference.to(device)
        return self

    def kernel_runs(self, x: torch.Tensor) -> bool:
        on_device = x.is_cuda or triton_fusion.interpreted()
        return available() and on_device and x.dtype == torch.float16 and x.dim() == 5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.kernel_runs(x):
            return self.reference(x)
        # quantized by torch's elementwise ops: under torch.compile, Inductor can fuse them into the kernel that
        # produces x (the normalization and activation before, or the decoder's concatenation), which then writes
        # one byte a value; eagerly they are a pass of their own
        xq = quant8.quantize(x, self.input_scale, self.fmt).contiguous(memory_format=CHANNELS_LAST)
        return _conv8_op(xq, self.taps, self.weight_scales, self.bias, self.input_scale, list(self.kernel),
                         list(self.stride))


def quantize_convolutions(network: torch.nn.Module, input_scales: dict[str, float], fmt: str) -> list[str]:
    """Replaces, in place and wherever the network holds it (``quant8.replace_layers``), each layer named in
    ``input_scales`` (``quant8.calibrate``'s result) that the kernel computes by a Conv8; returns the names
    replaced. Others (transposed convolutions) keep their precision."""
    replacements = {name: Conv8(network.get_submodule(name), scale, fmt) for name, scale in input_scales.items()
                    if supports(network.get_submodule(name))}
    quant8.replace_layers(network, replacements)
    return list(replacements)
