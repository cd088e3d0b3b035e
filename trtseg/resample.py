"""Resampling with nnU-Net's numerics, as torch operations that run on the GPU when the tensors live there.

nnU-Net resamples images with skimage.transform.resize (order 3, mode 'edge', no anti-aliasing), which is
scipy.ndimage.zoom with grid_mode=True: output voxel o samples input coordinate (o + 0.5) * n_in / n_out - 0.5,
a cubic B-spline of the edge-extended image, clipped to the input's value range. Along a separate (low-resolution)
z axis it uses map_coordinates with order_z (0: nearest, mode 'nearest'). Logits go back with order 1.

Every one of these is separable: a 1-D operator applied along each axis in turn. We build each operator once per
(n_in, n_out, order) in float64 and apply it:
  order 0: an index gather (the nearest input voxel, floor(c + 0.5), clamped);
  order 1: a two-tap gather and blend (equal to F.interpolate(..., align_corners=False));
  order 3: a dense (n_out, n_in) matrix that folds the B-spline prefilter (the exact inverse filter
           sqrt(3) * z^|k|, z = sqrt(3) - 2, on the edge-extended signal, truncated where z^|k| < 1e-16)
           into the cubic B-spline evaluation; one matmul per axis.
Results match scipy to float32 rounding (about 1e-6 relative); tests/test_resample.py checks this against nnU-Net's
own functions. No scipy runs here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

_Z = math.sqrt(3.0) - 2.0
_K = 28  # |z|^28 < 1e-16: the inverse filter's tail is below float64 resolution


def _source_coords(n_in: int, n_out: int) -> np.ndarray:
    """Input coordinate sampled by each output voxel (scipy zoom, grid_mode=True)."""
    return (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5


@lru_cache(maxsize=64)
def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    return np.clip(np.floor(_source_coords(n_in, n_out) + 0.5), 0, n_in - 1).astype(np.int64)


@lru_cache(maxsize=64)
def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    c = _source_coords(n_in, n_out)
    i0 = np.floor(c)
    t = c - i0
    lo = np.clip(i0, 0, n_in - 1).astype(np.int64)
    hi = np.clip(i0 + 1, 0, n_in - 1).astype(np.int64)
    return lo, hi, t


@lru_cache(maxsize=64)
def bspline3_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64 operator of a cubic B-spline resize with edge extension (prefilter included)."""
    c = _source_coords(n_in, n_out)
    i0 = np.floor(c).astype(np.int64)
    t = c - i0
    w = np.stack([(1 - t) ** 3 / 6, (4 - 6 * t ** 2 + 3 * t ** 3) / 6,
                  (1 + 3 * t + 3 * t ** 2 - 3 * t ** 3) / 6, t ** 3 / 6], axis=1)  # (n_out, 4)
    # prefilter rows for every coefficient index the evaluation touches: coeff[i] = sum_k h[k] x[clamp(i + k)]
    lo, hi = int(i0.min()) - 1, int(i0.max()) + 2
    idx = np.arange(lo, hi + 1)
    prefilter = np.zeros((idx.size, n_in))
    rows = np.arange(idx.size)
    for k in range(-_K, _K + 1):
        np.add.at(prefilter, (rows, np.clip(idx + k, 0, n_in - 1)), math.sqrt(3.0) * _Z ** abs(k))
    out = np.zeros((n_out, n_in))
    for j in range(4):
        out += w[:, j:j + 1] * prefilter[i0 - 1 + j - lo]
    return out


def resize_axis(x: torch.Tensor, dim: int, n_out: int, order: int) -> torch.Tensor:
    """Resizes ``x`` along ``dim`` to ``n_out`` voxels with interpolation ``order`` (0, 1 or 3)."""
    n_in = x.shape[dim]
    if n_in == n_out:
        return x
    dev = x.device
    if order == 0:
        return x.index_select(dim, torch.from_numpy(_nearest_index(n_in, n_out)).to(dev))
    if order == 1:
        lo, hi, t = _linear_taps(n_in, n_out)
        shape = [1] * x.ndim
        shape[dim] = n_out
        tt = torch.from_numpy(t).to(dev, x.dtype).view(shape)
        a = x.index_select(dim, torch.from_numpy(lo).to(dev))
        b = x.index_select(dim, torch.from_numpy(hi).to(dev))
        return torch.lerp(a, b, tt)
    if order == 3:
        m = torch.from_numpy(bspline3_matrix(n_in, n_out)).to(dev, x.dtype)
        return torch.matmul(x.movedim(dim, -1), m.T).movedim(-1, dim)
    raise ValueError(f"interpolation order {order} is not supported (0, 1 or 3)")


def _clip_to_input_range(out: torch.Tensor, inp: torch.Tensor, reduce_dims: tuple[int, ...]) -> torch.Tensor:
    """skimage.resize clips higher-order results to the input's range, per resize call."""
    lo = torch.amin(inp, dim=reduce_dims, keepdim=True)
    hi = torch.amax(inp, dim=reduce_dims, keepdim=True)
    return torch.maximum(torch.minimum(out, hi), lo)


def separate_z_axis(force_separate_z: bool | None, current_spacing, new_spacing, threshold: float = 3.0) -> int | None:
    """nnU-Net's determine_do_sep_z_and_axis: the axis resampled on its own, or None for a joint 3-D resize."""
    if force_separate_z is not None:
        if not force_separate_z:
            return None
        spacing = current_spacing
    elif max(current_spacing) / min(current_spacing) > threshold:
        spacing = current_spacing
    elif max(new_spacing) / min(new_spacing) > threshold:
        spacing = new_spacing
    else:
        return None
    axes = [i for i, s in enumerate(spacing) if max(spacing) / s == 1]
    return axes[0] if len(axes) == 1 else None


@dataclass(frozen=True)
class Plan:
    """How one resize will run: per-axis orders, and whether the result is clipped slice-wise or volume-wise."""

    orders: tuple[int, int, int]
    separate_axis: int | None
    clip: bool


def plan_resize(kind: str, order: int, order_z: int, force_separate_z: bool | None,
                current_spacing, new_spacing, threshold: float = 3.0, axis_map=None) -> Plan:
    """How nnU-Net resamples from ``current_spacing`` to ``new_spacing``.

    axis_map: nnU-Net v1's export quirk (see trtseg.export): when the axis comes from ``new_spacing``, v1 applies
    its index to data in another axis order; axis_map[i] is the axis index i lands on."""
    axis = separate_z_axis(force_separate_z, current_spacing, new_spacing, threshold)
    if axis is not None and axis_map is not None and force_separate_z is None and \
            not max(current_spacing) / min(current_spacing) > threshold:
        axis = axis_map[axis]
    orders = [order] * 3
    if axis is not None:
        orders[axis] = order_z
    # the "torch" kind is F.interpolate (linear), which never leaves the input range: no clip needed
    return Plan(tuple(orders), axis, clip=(kind == "default" and order > 1))  # type: ignore[arg-type]


def resample(data: torch.Tensor, new_shape, plan: Plan) -> torch.Tensor:
    """Resamples ``data`` (c, z, y, x) float32 to ``new_shape`` (z, y, x) following ``plan``.

    Same shape in, same tensor out (nnU-Net skips resampling then, too).
    """
    new_shape = tuple(int(s) for s in new_shape)
    if tuple(data.shape[1:]) == new_shape:
        return data
    x = data
    if plan.separate_axis is None:
        for ax in range(3):
            x = resize_axis(x, ax + 1, new_shape[ax], plan.orders[ax])
        if plan.clip:
            x = _clip_to_input_range(x, data, (1, 2, 3))
        return x
    a = plan.separate_axis
    in_plane = [ax for ax in range(3) if ax != a]
    if any(data.shape[ax + 1] != new_shape[ax] for ax in in_plane):
        for ax in in_plane:
            x = resize_axis(x, ax + 1, new_shape[ax], plan.orders[ax])
        if plan.clip:  # each 2-D slice was resized (and clipped) on its own
            x = _clip_to_input_range(x, data, tuple(ax + 1 for ax in in_plane))
    return resize_axis(x, a + 1, new_shape[a], plan.orders[a])


def compute_new_shape(old_shape, old_spacing, new_spacing) -> tuple[int, ...]:
    """nnU-Net's compute_new_shape: round(old_spacing / new_spacing * old_shape), Python's round (half to even)."""
    return tuple(int(round(float(s) / float(n) * int(k))) for s, n, k in zip(old_spacing, new_spacing, old_shape))


def _linear_like_scipy(x: torch.Tensor, new_shape, axes) -> torch.Tensor:
    """Linear resize of ``x`` (z, y, x) float64 along ``axes`` to ``new_shape``, summed exactly as scipy's zoom
    (order 1, grid_mode, edge) sums it: per output voxel, each corner's value times its per-axis weights in axis
    order, added corner by corner (last axis fastest). A binary mask interpolated to exactly 0.5 then ties on the
    same side of skimage's >= 0.5 as in nnU-Net's resize_segmentation; a separable resize differs there in the last
    bit. Axes not in ``axes`` keep their size and weight 1 (a 2-D resize of every slice). Output in chunks of
    slices, so the eight corner gathers stay small."""
    shape = tuple(int(s) for s in x.shape)
    new_shape = tuple(int(n) if d in axes else shape[d] for d, n in enumerate(new_shape))
    taps = []
    for d in range(3):
        if d in axes and shape[d] != new_shape[d]:
            lo, hi, t = _linear_taps(shape[d], new_shape[d])
        else:  # scipy's zoom by 1: each voxel's own value, weight 1
            lo = hi = np.arange(shape[d])
            t = np.zeros(shape[d])
        taps.append((torch.from_numpy(lo).to(x.device), torch.from_numpy(hi).to(x.device),
                     torch.from_numpy(1.0 - t).to(x.device, torch.float64), torch.from_numpy(t).to(x.device, torch.float64)))
    out = torch.empty(new_shape, dtype=torch.float64, device=x.device)
    (zl, zh, zw0, zw1), (yl, yh, yw0, yw1), (xl, xh, xw0, xw1) = taps
    step = max(1, (1 << 22) // max(1, new_shape[1] * new_shape[2]))
    for z0 in range(0, new_shape[0], step):
        zs = slice(z0, min(z0 + step, new_shape[0]))
        acc = torch.zeros((zs.stop - zs.start, new_shape[1], new_shape[2]), dtype=torch.float64, device=x.device)
        for zi, wz in ((zl[zs], zw0[zs]), (zh[zs], zw1[zs])):
            for yi, wy in ((yl, yw0), (yh, yw1)):
                for xi, wx in ((xl, xw0), (xh, xw1)):
                    v = x[zi[:, None, None], yi[None, :, None], xi[None, None, :]]
                    acc += ((v * wz[:, None, None]) * wy[None, :, None]) * wx[None, None, :]
        out[zs] = acc
    return out


def resample_seg(seg: torch.Tensor, new_shape, plan: Plan) -> torch.Tensor:
    """A label map (z, y, x) resampled as nnU-Net's resample_data_or_seg(is_seg=True) does with batchgenerators'
    resize_segmentation: each present label's indicator resized (the plan's orders, float64, summed as scipy
    does), the voxel given the label with the largest score, exact ties settled by the nearest-neighbour label
    when it is one of the tied ('nearest'), else the smallest; with a separate axis slice by slice in-plane, then
    the nearest slice along that axis. Returns int32 (z, y, x)."""
    new_shape = tuple(int(s) for s in new_shape)
    a = plan.separate_axis
    axes = tuple(d for d in range(3) if d != a)
    inplane_shape = tuple(new_shape[d] if d in axes else int(seg.shape[d]) for d in range(3))
    labels = [int(c) for c in torch.unique(seg).tolist()]
    nearest = seg
    for d in axes:
        nearest = resize_axis(nearest, d, inplane_shape[d], 0)

    def score(c: int) -> torch.Tensor:
        mask = (seg == c).double()
        if all(plan.orders[d] == 1 for d in axes):
            return _linear_like_scipy(mask, inplane_shape, axes)
        m = mask[None]
        for d in axes:
            m = resize_axis(m, d + 1, inplane_shape[d], plan.orders[d])
        return m[0]

    if len(labels) == 1:
        out = torch.full(inplane_shape, labels[0], dtype=torch.int32, device=seg.device)
    else:
        best = win = nearest_score = None
        for c in labels:  # ascending: a strict '>' keeps the first label attaining the maximum
            sc = score(c)
            if best is None:
                best, win = sc, torch.full(inplane_shape, c, dtype=torch.int32, device=seg.device)
                nearest_score = torch.where(nearest == c, sc, torch.zeros_like(sc))
                continue
            win = torch.where(sc > best, torch.full_like(win, c), win)
            nearest_score = torch.where(nearest == c, sc, nearest_score)
            best = torch.maximum(best, sc)
        assert best is not None and win is not None and nearest_score is not None
        out = torch.where((nearest_score == best) & (best > 0), nearest.to(torch.int32), win)
    if a is not None and out.shape[a] != new_shape[a]:
        if plan.orders[a] == 0:
            out = resize_axis(out, a, new_shape[a], 0)
        else:  # nnU-Net: each label's mask along the axis, rounded, > 0.5
            final = torch.zeros(new_shape, dtype=torch.int32, device=seg.device)
            for c in labels:
                m = resize_axis((out == c).double()[None], a + 1, new_shape[a], plan.orders[a])[0]
                final[torch.round(m) > 0.5] = c
            out = final
    return out


def resample_seg_onehot(seg: torch.Tensor, new_shape, plan: Plan, labels) -> torch.Tensor:
    """``resample_seg`` as one-hot channels (len(labels), z, y, x) float32 of ``labels``: a cascade's
    previous-stage input (nnU-Net's convert_labelmap_to_one_hot)."""
    out = resample_seg(seg, new_shape, plan)
    return torch.stack([(out == int(c)).float() for c in labels])
