"""Triton kernels that fuse InstanceNorm + LeakyReLU into the 3x3x3 convolutions around it (CUDA, fp16, channels-last).

nnU-Net's convolution blocks are conv -> InstanceNorm -> LeakyReLU. Unfused, each block's normalization reads the
convolution's output twice (once for the statistics, once to normalize) and writes it once more; at full resolution
that is three passes over 128 MiB per 128^3 tile. These kernels move those passes into the convolutions:

- ``conv3x3x3``: a 3x3x3, stride-1, padding-1 convolution (implicit GEMM; each program computes rows of output
  voxels along x by all output channels, width-folded like ``trtseg.accel.rewrites.conv_fold``), which adds each output channel's
  sum and sum of squares per sample as it writes (what the next InstanceNorm needs), and can add a merged
  upsampling's output (``trtseg.accel.rewrites.upsample_merge``) as it writes. Normalizing the input as the convolution reads it (a
  prologue) was tried and not kept: on the H100 it made the convolution 2.6x slower, as cuDNN's prologue is.
- ``stem_conv_norm_act``: the first block (1..4 input channels): the convolution is cheap next to its output, so it is
  computed twice, once for the statistics and once to write the normalized, activated output; the raw output is never
  written.
- ``norm_act_pointwise``: InstanceNorm + LeakyReLU + a 1x1x1 convolution (the segmentation head) in one pass.

Tensors are (b, c, z, y, x) in channels-last-3d memory order, fp16 (the head writes its logits contiguous);
statistics are fp32, per (sample, channel).
Values: the products of each convolution are summed in another order than cuDNN's, and the statistics are sums and
sums of squares in fp32 (variance = E[x^2] - mean^2) where PyTorch uses Welford's updates; results equal the unfused
network's up to fp16 rounding.
"""
from __future__ import annotations

import os
import re
from typing import Any

import torch

from trtseg.accel.rewrites.conv_fold import fold_weight

try:  # Triton ships with CUDA builds of PyTorch; CPU machines run the unfused network
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without Triton
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]

CHANNELS_LAST = torch.channels_last_3d


def available() -> bool:
    return triton is not None


def interpreted() -> bool:
    """Whether Triton runs its kernels in its interpreter (TRITON_INTERPRET=1): on CPU tensors, for tests."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


if triton is not None:
    @triton.jit
    def _row_tile(D, ROWS: tl.constexpr, BLOCK_X: tl.constexpr):
        """Program (x tile, y row block, b*D + z) -> (b, z, m, y, x): its ROWS*BLOCK_X positions m, ROWS rows y of
        BLOCK_X positions x each (coarse positions where the width is folded)."""
        pid_x, pid_y, pid_bz = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        m = tl.arange(0, ROWS * BLOCK_X)
        return pid_bz // D, pid_bz % D, m, pid_y * ROWS + m // BLOCK_X, pid_x * BLOCK_X + m % BLOCK_X

    @triton.jit
    def _store_partial_sums(sum_ptr, sq_ptr, o, cols, NCOL: tl.constexpr):
        """The program's column sums and sums of squares of o (zero outside the volume), as its own row of
        partial sums: atomics on b*COUT addresses from every program serialize (+1 ms at full resolution)."""
        row = (tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(0) + tl.program_id(0)
        tl.store(sum_ptr + row * NCOL + cols, tl.sum(o, 0))
        tl.store(sq_ptr + row * NCOL + cols, tl.sum(o * o, 0))

    @triton.jit
    def _conv3x3x3_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, sum_ptr, sq_ptr, add_ptr, D, H, W, JZ, JY, JX, LZ, LY, LX,
                          CIN: tl.constexpr, COUT: tl.constexpr, FOLD: tl.constexpr, BLOCK_X: tl.constexpr,
                          ROWS: tl.constexpr, KX: tl.constexpr, HAS_BIAS: tl.constexpr, STATS: tl.constexpr,
                          STAGES: tl.constexpr, ADD: tl.constexpr, SZ: tl.constexpr, SY: tl.constexpr,
                          SX: tl.constexpr):
        """Program (x tile, y row block, b*D + z): ROWS rows of BLOCK_X coarse positions X, each FOLD fine voxels
        x = FOLD*X + p; output column p*COUT + c is channel c of voxel x (``trtseg.accel.rewrites.conv_fold``'s width folding: FOLD+2
        taps along x, wider matrix tiles). KX (a divisor of FOLD+2) taps along x go into one matrix product of
        depth KX*CIN: in channels-last order their inputs are KX*CIN contiguous values, so the tile is one run of
        memory per row and each (z, y) tap takes (FOLD+2)/KX products instead of FOLD+2 of depth CIN. ADD: adds a
        merged upsampling's output in slot order (``trtseg.accel.rewrites.upsample_merge.slots_to_volume``: (b, SZ*SY*SX*COUT, JZ,
        JY, JX), fine position s*j + slot - lead)."""
        NCOL: tl.constexpr = FOLD * COUT
        TX: tl.constexpr = FOLD + 2
        STEPS_X: tl.constexpr = TX // KX
        b, z, m, yy, xc = _row_tile(D, ROWS, BLOCK_X)
        k = tl.arange(0, KX * CIN)  # depth index: x tap (within this step) k // CIN, input channel k % CIN
        n = tl.arange(0, NCOL)
        acc = tl.zeros((ROWS * BLOCK_X, NCOL), dtype=tl.float32)
        zz = z + m * 0  # a vector: Triton's interpreter cannot mask with a scalar condition
        for t in tl.range(0, 9 * STEPS_X, num_stages=STAGES):
            zi = zz + t // (3 * STEPS_X) - 1
            yi = yy + (t // STEPS_X) % 3 - 1
            x0 = xc * FOLD + (t % STEPS_X) * KX - 1  # the step's first input position along x
            row_ok = (zi >= 0) & (zi < D) & (yi >= 0) & (yi < H)
            xi = x0[:, None] + (k // CIN)[None, :]
            valid = row_ok[:, None] & (xi >= 0) & (xi < W)
            first = ((b * D + zi).to(tl.int64) * H + yi) * W + x0
            a = tl.load(x_ptr + first[:, None] * CIN + k[None, :], mask=valid, other=0.0)
            # taps_weight's rows tap*CIN + c, tap = (dz*3 + dy)*TX + dx: this step's KX*CIN rows are contiguous
            w = tl.load(w_ptr + t * (KX * CIN * NCOL) + k[:, None] * NCOL + n[None, :])
            acc = tl.dot(a, w, acc)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n % COUT)[None, :].to(tl.float32)
        inside = (yy < H) & (xc * FOLD < W)
        if ADD:
            fz = zz + LZ
            fy = yy + LY
            fx = (xc * FOLD + LX)[:, None] + (n // COUT)[None, :]
            slot = ((fz % SZ) * SY + fy % SY)[:, None] * SX + fx % SX
            coarse = ((b * JZ + fz // SZ).to(tl.int64) * JY + fy // SY)[:, None] * JX + fx // SX
            acc += tl.load(add_ptr + coarse * (SZ * SY * SX * COUT) + slot * COUT + (n % COUT)[None, :],
                           mask=inside[:, None] & (n < NCOL)[None, :], other=0.0).to(tl.float32)
        out = acc.to(tl.float16)
        voxel = ((b * D + z).to(tl.int64) * H + yy) * W + xc * FOLD
        tl.store(y_ptr + voxel[:, None] * COUT + n[None, :], out, mask=inside[:, None] & (n < NCOL)[None, :])
        if STATS:  # of the stored (fp16) values, as the next InstanceNorm sees them
            _store_partial_sums(sum_ptr, sq_ptr, tl.where(inside[:, None], out.to(tl.float32), 0.0), n, NCOL)

    @triton.jit
    def _stem_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, scale_ptr, shift_ptr, sum_ptr, sq_ptr, D, H, W,
                     CIN: tl.constexpr, K: tl.constexpr, COUT: tl.constexpr, BLOCK_X: tl.constexpr,
                     ROWS: tl.constexpr, APPLY: tl.constexpr, SLOPE: tl.constexpr, HAS_BIAS: tl.constexpr):
        """The first convolution (CIN*27 <= K taps gathered into one K-wide row per voxel). APPLY=False: add the
        output's per-channel sums and sums of squares; APPLY=True: write the normalized, activated output."""
        b, z, m, yy, xx = _row_tile(D, ROWS, BLOCK_X)
        k = tl.arange(0, K)
        tap = k // CIN
        c = k % CIN
        zi = z + tap // 9 - 1
        yi = yy[:, None] + ((tap // 3) % 3 - 1)[None, :]
        xi = xx[:, None] + (tap % 3 - 1)[None, :]
        valid = ((tap < 27) & (zi >= 0) & (zi < D))[None, :] & (yi >= 0) & (yi < H) & (xi >= 0) & (xi < W)
        voxel = ((b * D + zi).to(tl.int64)[None, :] * H + yi) * W + xi
        a = tl.load(x_ptr + voxel * CIN + c[None, :], mask=valid, other=0.0)
        co = tl.arange(0, COUT)
        w = tl.load(w_ptr + k[:, None] * COUT + co[None, :])
        acc = tl.dot(a, w)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + co)[None, :].to(tl.float32)
        out = acc.to(tl.float16).to(tl.float32)
        inside = (yy < H) & (xx < W)
        if APPLY:
            v = out * tl.load(scale_ptr + b * COUT + co)[None, :] + tl.load(shift_ptr + b * COUT + co)[None, :]
            v = tl.where(v >= 0, v, v * SLOPE)
            here = ((b * D + z).to(tl.int64) * H + yy) * W + xx
            tl.store(y_ptr + here[:, None] * COUT + co[None, :], v.to(tl.float16),
                     mask=inside[:, None] & (co < COUT)[None, :])
        else:
            _store_partial_sums(sum_ptr, sq_ptr, tl.where(inside[:, None], out, 0.0), co, COUT)

    @triton.jit
    def _norm_act_pointwise_kernel(x_ptr, scale_ptr, shift_ptr, w_ptr, bias_ptr, y_ptr, voxels,
                                   CIN: tl.constexpr, COUT: tl.constexpr, NPAD: tl.constexpr, SLOPE: tl.constexpr,
                                   HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        """Program (voxel block, b): y = W @ LeakyReLU(x * scale + shift) + bias over BLOCK voxels of sample b."""
        pid, b = tl.program_id(0), tl.program_id(1)
        v = pid * BLOCK + tl.arange(0, BLOCK)
        inside = v < voxels
        ci = tl.arange(0, CIN)
        n = tl.arange(0, NPAD)
        row = b.to(tl.int64) * voxels + v
        a = tl.load(x_ptr + row[:, None] * CIN + ci[None, :], mask=inside[:, None] & (ci < CIN)[None, :],
                    other=0.0).to(tl.float32)
        a = a * tl.load(scale_ptr + b * CIN + ci)[None, :] + tl.load(shift_ptr + b * CIN + ci)[None, :]
        a = tl.where(a >= 0, a, a * SLOPE).to(tl.float16)
        w = tl.load(w_ptr + ci[:, None] * NPAD + n[None, :])
        acc = tl.dot(a, w)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n, mask=n < COUT, other=0.0)[None, :].to(tl.float32)
        # (b, COUT, voxels) order: each channel's plane is contiguous, as the engine hands logits on
        tl.store(y_ptr + (b * COUT + n[None, :]).to(tl.int64) * voxels + v[:, None], acc.to(tl.float16),
                 mask=inside[:, None] & (n < COUT)[None, :])


def _check(x: torch.Tensor, name: str) -> None:
    if x.dtype != torch.float16 or x.dim() != 5 or not x.is_contiguous(memory_format=CHANNELS_LAST):
        raise ValueError(f"{name}: want a 5-d fp16 channels-last-3d tensor, got {x.dtype} {tuple(x.shape)} "
                         f"strides {x.stride()}")


def _partial_sums(grid: tuple[int, int, int], b: int, cols: int, device: torch.device) -> torch.Tensor:
    """(2, b, programs per sample, cols) fp32: each program's row of sums and of sums of squares."""
    return torch.empty((2, b, grid[0] * grid[1] * grid[2] // b, cols), device=device, dtype=torch.float32)


def _total(partial: torch.Tensor, fold: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-(sample, channel) sums and sums of squares from ``_partial_sums`` rows whose columns are fold
    phases of the channels: two tensors, not views of one (a custom op may not return aliases)."""
    sums, squares = (part.sum(1).view(part.shape[0], fold, -1).sum(1) for part in partial)
    return sums, squares


def taps_weight(weight: torch.Tensor, fold: int = 1) -> torch.Tensor:
    """(COUT, CIN, 3, 3, 3) -> (9*(fold+2)*CIN, fold*COUT) fp16: row tap*CIN + c, tap = (dz*3 + dy)*(fold+2) + dx
    over the fold+2 input positions x = fold*X + dx - 1; column p*COUT + o is output channel o at x = fold*X + p."""
    cout, cin = weight.shape[:2]
    w = fold_weight(weight.detach(), fold) if fold > 1 else weight.detach()  # (fold*COUT, CIN, 3, 3, fold+2)
    return w.permute(2, 3, 4, 1, 0).reshape(9 * (fold + 2) * cin, fold * cout).to(torch.float16).contiguous()


def stem_taps(weight: torch.Tensor) -> torch.Tensor:
    """(COUT, CIN, 3, 3, 3) -> ``taps_weight``'s (27*CIN, COUT) rows, zero-padded to K = max(32, next power of two)
    rows: the stem kernel gathers each voxel's 27*CIN inputs into one K-wide row."""
    taps = taps_weight(weight)
    padded = taps.new_zeros((max(32, triton.next_power_of_2(taps.shape[0])), taps.shape[1]))
    padded[:taps.shape[0]] = taps
    return padded


def head_weight(weight: torch.Tensor) -> torch.Tensor:
    """A 1x1x1 convolution's (COUT, CIN, 1, 1, 1) weight -> (CIN, NPAD) fp16, NPAD = max(16, next power of two)
    columns, zero beyond COUT."""
    cout, cin = weight.shape[:2]
    wt = weight.new_zeros((cin, max(16, triton.next_power_of_2(cout))), dtype=torch.float16)
    wt[:, :cout] = weight.detach().reshape(cout, cin).t()
    return wt


def norm_scale_shift(sums: torch.Tensor, squares: torch.Tensor, count: int, weight: torch.Tensor | None,
                     bias: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(sample, channel) sums and sums of squares over ``count`` voxels -> InstanceNorm as x * scale + shift
    (fp32, (b, c) contiguous); ``weight``/``bias`` are the norm's affine parameters (None: 1 and 0)."""
    mean = sums / count
    var = (squares / count - mean * mean).clamp_min(0)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.float()
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.float()
    return scale.contiguous(), shift.contiguous()


# conv3x3x3's launch configurations: (BLOCK_X coarse positions, ROWS, num_warps, pipeline stages, KX x taps per
# matrix product), keyed "FOLD", "FOLD/CIN" or "FOLD/CIN+slots" (adding a merged upsampling's slots); the most
# specific key present wins. Each entry is the fastest that ``python -m benchmarks.fused_conv`` found on an NVIDIA
# H200 for the engine's shapes at batch 4: 32->32 at 128^3 (fold 2, coarse width 64) and the same adding slots.
# Another GPU may want other tiles: TRTSEG_CONV_CONFIGS="2/32:64,2,4,4,1;2/32+slots:32,4,4,3,2" replaces or adds
# entries (the sweep prints its fastest). It is read when the first fused convolution is configured, not at import,
# so an engine without --fuse-norms never depends on it.
CONV_CONFIGS: dict[str, tuple[int, int, int, int, int]] = {
    "2": (64, 2, 4, 4, 1), "2/32+slots": (32, 4, 4, 3, 2), "1": (128, 1, 8, 4, 1)}
_ENV_READ = False
_KEY = re.compile(r"^[0-9]+(/[0-9]+)?(\+slots)?$")


def parse_conv_configs(text: str) -> dict[str, tuple[int, int, int, int, int]]:
    """"KEY:BLOCK_X,ROWS,WARPS,STAGES,KX;..." (KEY as in ``CONV_CONFIGS``) -> {key: config}; a malformed entry is
    refused with the reason."""
    return parse_launch_configs(text, "TRTSEG_CONV_CONFIGS", _KEY, "FOLD[/CIN][+slots]:BLOCK_X,ROWS,WARPS,STAGES,KX "
                                "(positive integers)")  # type: ignore[return-value]


def parse_launch_configs(text: str, variable: str, key: re.Pattern, syntax: str, powers_of_two: int = 0
                         ) -> dict[str, tuple[int, ...]]:
    """The launch-configuration tables the kernels' environment variables hold: "KEY:N,N,N,N,N;..." -> {key: five
    positive integers, the first ``powers_of_two`` of them powers of two}; an entry that is not is refused, naming
    ``variable`` and the ``syntax``."""
    table: dict[str, tuple[int, ...]] = {}
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        try:
            name, values = (part.strip() for part in entry.split(":"))
            config = tuple(int(v) for v in values.split(","))
            if not key.match(name) or len(config) != 5 or min(config) < 1 or any(
                    c & (c - 1) for c in config[:powers_of_two]):
                raise ValueError
        except ValueError:
            raise ValueError(f"{variable}: entry {entry!r} is not {syntax}") from None
        table[name] = config
    return table


def _with_environment() -> dict[str, tuple[int, int, int, int, int]]:
    """CONV_CONFIGS with TRTSEG_CONV_CONFIGS' entries applied, the first time a configuration is asked for."""
    global _ENV_READ
    if not _ENV_READ:
        CONV_CONFIGS.update(parse_conv_configs(os.environ.get("TRTSEG_CONV_CONFIGS", "")))
        _ENV_READ = True
    return CONV_CONFIGS


def _depth_ok(kx: int, fold: int, cin: int) -> bool:
    """Whether KX taps a product fit: KX divides the fold+2 taps along x and KX*CIN is a power of two (Triton's
    tile sizes)."""
    depth = kx * cin
    return kx >= 1 and (fold + 2) % kx == 0 and depth & (depth - 1) == 0


def conv_config(fold: int, cin: int, slots: bool = False) -> tuple[int, int, int, int, int]:
    """The ``CONV_CONFIGS`` entry for this convolution (most specific key first; fold 1's for an unknown fold), with
    KX lowered to the largest that fits CIN (1 always does, for power-of-two CIN)."""
    keys = ([f"{fold}/{cin}+slots"] if slots else []) + [f"{fold}/{cin}", f"{fold}", "1"]
    table = _with_environment()
    block_x, rows, warps, stages, kx = next(table[k] for k in keys if k in table)
    while kx > 1 and not _depth_ok(kx, fold, cin):
        kx -= 1
    return block_x, rows, warps, stages, kx


def conv3x3x3(x: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor | None, *, fold: int = 1, stats: bool = False,
              slots: torch.Tensor | None = None, slot_stride: tuple[int, int, int] = (1, 1, 1),
              slot_lead: tuple[int, int, int] = (0, 0, 0),
              config: tuple[int, int, int, int, int] | None = None) -> tuple[torch.Tensor, Any, Any]:
    """y = conv3x3x3(x) + bias (stride 1, zero padding 1) [+ ``slots_to_volume(slots, slot_stride, slot_lead)``],
    and with ``stats`` y's per-(sample, channel) fp32 sums and sums of squares. x: (b, CIN, z, y, x) fp16
    channels-last, its width divisible by ``fold``; taps from ``taps_weight(weight, fold)``; slots: fp16
    channels-last. config: (BLOCK_X coarse positions, ROWS, num_warps, pipeline stages, KX x taps per matrix
    product); by default ``conv_config(fold, CIN, slots given)``. Returns (y, sums or None, squares or None)."""
    _check(x, "conv3x3x3 input")
    b, cin, d, h, w = x.shape
    if w % fold:
        raise ValueError(f"conv3x3x3: width {w} is not divisible by fold {fold}")
    ncol = taps.shape[1]
    cout = ncol // fold
    block_x, rows, warps, stages, kx = config or conv_config(fold, cin, slots is not None)
    if not _depth_ok(kx, fold, cin):
        raise ValueError(f"conv3x3x3: KX={kx} taps a product do not fit fold {fold} and {cin} input channels "
                         f"(KX must divide {fold + 2} and KX*CIN be a power of two)")
    y = torch.empty((b, cout, d, h, w), device=x.device, dtype=torch.float16, memory_format=CHANNELS_LAST)
    grid = (triton.cdiv(w // fold, block_x), triton.cdiv(h, rows), b * d)
    partial = _partial_sums(grid, b, ncol, x.device) if stats else None
    dummy = taps
    jz = jy = jx = 1
    if slots is not None:
        _check(slots, "conv3x3x3 slots")
        jz, jy, jx = slots.shape[2:]
    sums_out, squares_out = (partial[0], partial[1]) if partial is not None else (dummy, dummy)
    _conv3x3x3_kernel[grid](x, taps, bias if bias is not None else dummy, y, sums_out, squares_out,
                            slots if slots is not None else dummy, d, h, w, jz, jy, jx, *slot_lead, CIN=cin,
                            COUT=cout, FOLD=fold, BLOCK_X=block_x, ROWS=rows, KX=kx,
                            HAS_BIAS=bias is not None, STATS=stats, STAGES=stages, ADD=slots is not None,
                            SZ=slot_stride[0], SY=slot_stride[1], SX=slot_stride[2], num_warps=warps)
    if partial is None:
        return y, None, None
    return (y, *_total(partial, fold))


def stem_conv_norm_act(x: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor | None, norm_weight: torch.Tensor | None,
                       norm_bias: torch.Tensor | None, eps: float, slope: float = 0.01,
                       config: tuple[int, int, int] = (128, 1, 4)) -> torch.Tensor:
    """LeakyReLU(InstanceNorm(conv3x3x3(x) + bias)) for a few input channels; the convolution's output is never
    written. x: (b, CIN, z, y, x) fp16 channels-last; taps: (K, COUT) from ``stem_taps``."""
    _check(x, "stem input")
    b, cin, d, h, w = x.shape
    k, cout = taps.shape
    if k < 27 * cin:
        raise ValueError(f"stem: {k} tap rows for {cin} input channels; stem_taps gives 27*CIN or more")
    block_x, rows, warps = config
    grid = (triton.cdiv(w, block_x), triton.cdiv(h, rows), b * d)
    partial = _partial_sums(grid, b, cout, x.device)
    y = torch.empty((b, cout, d, h, w), device=x.device, dtype=torch.float16, memory_format=CHANNELS_LAST)
    args = dict(CIN=cin, K=k, COUT=cout, BLOCK_X=block_x, ROWS=rows, SLOPE=slope, HAS_BIAS=bias is not None,
                num_warps=warps)
    dummy = taps
    _stem_kernel[grid](x, taps, bias if bias is not None else dummy, y, dummy, dummy, partial[0], partial[1], d, h,
                       w, APPLY=False, **args)
    scale, shift = norm_scale_shift(*_total(partial), d * h * w, norm_weight, norm_bias, eps)
    _stem_kernel[grid](x, taps, bias if bias is not None else dummy, y, scale, shift, dummy, dummy, d, h, w,
                       APPLY=True, **args)
    return y


def norm_act_pointwise(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None, classes: int, slope: float = 0.01, block: int = 128,
                       warps: int = 2) -> torch.Tensor:
    """conv1x1x1(LeakyReLU(x * scale + shift)) + bias, ``classes`` output channels. x: (b, CIN, z, y, x) fp16
    channels-last; weight: (CIN, NPAD) from ``head_weight``; scale, shift (b, CIN) fp32. Returns (b, classes, z, y,
    x) fp16, contiguous (the logits' order)."""
    _check(x, "pointwise input")
    b, cin, d, h, w = x.shape
    cout, (_, npad) = classes, weight.shape
    y = torch.empty((b, cout, d, h, w), device=x.device, dtype=torch.float16)
    voxels = d * h * w
    grid = (triton.cdiv(voxels, block), b)
    _norm_act_pointwise_kernel[grid](x, scale, shift, weight, bias if bias is not None else weight, y, voxels, CIN=cin,
                                     COUT=cout, NPAD=npad, SLOPE=slope, HAS_BIAS=bias is not None, BLOCK=block,
                                     num_warps=warps)
    return y
