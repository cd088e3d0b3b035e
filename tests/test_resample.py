"""trtseg's torch resampling against nnU-Net's own functions (scipy/skimage and its torch variant)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape
from nnunetv2.preprocessing.resampling.resample_torch import resample_torch_fornnunet
from scipy.ndimage import binary_fill_holes

from trtseg.preprocess import bbox_of, fill_holes
from trtseg import resample as rs
from trtseg.resample import compute_new_shape, plan_resize, resample

CASES = [
    ((1, 13, 40, 37), (20, 31, 55), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0)),   # joint 3-D, up and down
    ((2, 9, 30, 33), (25, 30, 29), (5.0, 1.0, 1.0), (1.0, 1.0, 1.0)),    # separate z (current spacing)
    ((1, 30, 20, 25), (12, 50, 41), (1.0, 1.3, 1.3), (4.0, 1.0, 1.0)),   # separate z (target spacing)
    ((1, 20, 24, 22), (20, 31, 17), (1.0, 0.5, 0.5), (1.0, 1.0, 1.0)),   # z unchanged
    ((1, 11, 12, 13), (11, 12, 13), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0)),   # nothing to do
]


@pytest.mark.parametrize("shape,new_shape,cur,new", CASES)
@pytest.mark.parametrize("order", [3, 1])
def test_default_resampling_matches_nnunet(shape, new_shape, cur, new, order):
    data = (np.random.default_rng(0).normal(size=shape) * 100).astype(np.float32)
    ref = resample_data_or_seg_to_shape(data, new_shape, cur, new, False, order, 0, None)
    ours = resample(torch.from_numpy(data), new_shape, plan_resize("default", order, 0, None, cur, new)).numpy()
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=2e-4 * np.abs(ref).max())


@pytest.mark.parametrize("shape,new_shape,cur,new", CASES)
def test_torch_resampling_matches_nnunet(shape, new_shape, cur, new):
    data = (np.random.default_rng(1).normal(size=shape) * 100).astype(np.float32)
    ref = resample_torch_fornnunet(torch.from_numpy(data), new_shape, cur, new, is_seg=False).numpy()
    ours = resample(torch.from_numpy(data), new_shape, plan_resize("torch", 1, 0, None, cur, new)).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-3)


def test_compute_new_shape_rounds_like_python():
    assert compute_new_shape((240, 512, 512), (1.25, 0.7, 0.7), (1.0, 0.78, 0.78)) == (300, 459, 459)
    assert compute_new_shape((5,), (1.0,), (2.0,)) == (2,)  # round(2.5) == 2: half to even, as nnU-Net


def test_fill_holes_and_bbox_match_scipy_and_acvl():
    rng = np.random.default_rng(3)
    m = rng.random((30, 40, 35)) > 0.55
    m[5:25, 10:30, 8:30] = True
    m[10:15, 15:20, 12:18] = False  # an enclosed cavity
    m[0, :, :] = False
    ours = fill_holes(torch.from_numpy(m)).numpy()
    np.testing.assert_array_equal(ours, binary_fill_holes(m))
    assert bbox_of(torch.from_numpy(m)) == [[int(np.where(m.any((1, 2)))[0][i]) + j for i, j in ((0, 0), (-1, 1))],
                                            [int(np.where(m.any((0, 2)))[0][i]) + j for i, j in ((0, 0), (-1, 1))],
                                            [int(np.where(m.any((0, 1)))[0][i]) + j for i, j in ((0, 0), (-1, 1))]]


@pytest.mark.parametrize("spacing,new_shape", [((2.4, 0.8, 0.8), (26, 48, 54)),   # separate z (ratio 3.0000001)
                                                ((1.5, 0.9, 1.1), (19, 40, 61)),   # joint 3-D
                                                ((1.0, 1.0, 1.0), (22, 60, 68))])  # unchanged shape
def test_segmentation_resampling_is_nnunets(spacing, new_shape):
    """A label map with -1 (outside the nonzero box), background and three labels, resampled as nnU-Net's
    resample_data_or_seg_to_shape(is_seg=True, order 1, order_z 0) does: identical labels."""
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape
    rng = np.random.default_rng(1)
    seg = rng.integers(-1, 4, (22, 60, 68)).astype(np.int16)
    seg = np.where(rng.random(seg.shape) < 0.7, np.roll(seg, 1, axis=2), seg)  # some structure, some noise
    target = tuple(s * n_old / n for s, n_old, n in zip(spacing, seg.shape, new_shape))
    ref = resample_data_or_seg_to_shape(seg[None], new_shape, spacing, target, is_seg=True, order=1, order_z=0,
                                        force_separate_z=None)[0]
    plan = rs.plan_resize("default", 1, 0, None, spacing, target)
    ours = rs.resample_seg(torch.from_numpy(seg.astype(np.int32)), new_shape, plan).numpy()
    assert ours.shape == ref.shape
    assert (ours != ref).sum() == 0, f"{(ours != ref).sum()} of {ref.size} labels differ"
