"""The connected-component core of nnU-Net's postprocessing (trtseg/postprocess.py): cc3d and scipy's fallback give
the same components, and the steps keep what nnU-Net keeps (parity with nnU-Net's own code is in test_parity.py and
test_v1.py)."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from trtseg import postprocess


def _speckled(shape, seed):
    rng = np.random.default_rng(seed)
    return rng.random(shape) > 0.88  # sparse enough not to percolate at 26 neighbours


@pytest.mark.parametrize("shape", [(40, 36), (20, 24, 18)])
@pytest.mark.parametrize("full", [True, False])
def test_cc3d_and_scipy_give_the_same_components(shape, full):
    mask = _speckled(shape, 3)
    ids_c, sizes_c = postprocess._label(mask, full, "cc3d")
    ids_s, sizes_s = postprocess._label(mask, full, "scipy")
    assert len(sizes_c) == len(sizes_s) > 10
    assert sorted(sizes_c[1:]) == sorted(sizes_s[1:])
    # the same partition: each cc3d component is exactly one scipy component
    pairs = set(zip(ids_c[mask].tolist(), ids_s[mask].tolist()))
    assert len(pairs) == len(sizes_c) - 1


def test_largest_components_keeps_ties_and_sizes_above_the_minimum_with_either_library(monkeypatch):
    mask = np.zeros((12, 12, 12), bool)
    mask[0:3, 0:3, 0:3] = True    # 27 voxels
    mask[6:9, 6:9, 6:9] = True    # 27: a tie, both kept
    mask[0:2, 10:12, 10:12] = True  # 8
    mask[11, 0, 0] = True         # 1
    for blocked in (False, True):
        if blocked:  # the fallback: cc3d that does not import
            monkeypatch.setitem(sys.modules, "cc3d", None)
        ties = postprocess.largest_components(mask, True)
        assert ties.sum() == 54 and ties[0, 0, 0] and ties[7, 7, 7]
        with_min = postprocess.largest_components(mask, False, keep_min_size=8 * 0.5, voxel_volume=0.5)
        assert with_min.sum() == 62 and not with_min[11, 0, 0]
        one = mask.copy()
        one[6:9, 6:9, 6:9] = False
        assert postprocess.largest_components(one, True).sum() == 27


def test_a_step_over_a_region_sets_the_removed_voxels_to_background():
    mask = np.zeros((10, 10, 10), np.uint8)
    mask[0:4, 0:4, 0:4] = 2
    mask[0:4, 0:4, 4:5] = 3        # touches the 2s: one component of the region {2, 3}
    mask[8:10, 8:10, 8:10] = 3     # a separate, smaller component of the region
    mask[5, 5, 5] = 1              # label 1 is not in the region: untouched
    pp = postprocess.Postprocessing(steps=(postprocess.Step(targets=((2, 3),)),), kind="nnunetv2", labels=(2, 3))
    out, removed = pp.apply(mask)
    assert removed == 8 and not out[8:, 8:, 8:].any() and out[5, 5, 5] == 1
    assert (out[0:4, 0:4, 0:4] == 2).all() and (out[0:4, 0:4, 4] == 3).all()
