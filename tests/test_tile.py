"""Tiling against nnU-Net: tile starts, Gaussian importance map, padding."""
from __future__ import annotations

import pytest
import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window

from trtseg.tile import compute_steps, gaussian_importance, pad_to_patch


@pytest.mark.parametrize("image,tile,step", [((128, 128, 128), (128, 128, 128), 0.5), ((300, 459, 459), (128, 128, 128), 0.5),
                                             ((57, 33, 101), (24, 32, 40), 0.5), ((57, 33, 101), (24, 32, 40), 0.3),
                                             ((40, 40, 40), (32, 32, 32), 1.0)])
def test_steps_match_nnunet(image, tile, step):
    assert compute_steps(image, tile, step) == compute_steps_for_sliding_window(image, tile, step)


@pytest.mark.parametrize("tile", [(128, 128, 128), (24, 32, 40), (16, 32, 32), (7, 9, 11)])
def test_gaussian_matches_nnunet(tile):
    ref = compute_gaussian(tile, sigma_scale=1.0 / 8, value_scaling_factor=10, device=torch.device("cpu"))
    ours = gaussian_importance(tile)
    assert torch.equal(ours, ref.float()), "the float16 Gaussian values must be nnU-Net's exactly"


def test_padding_matches_acvl():
    x = torch.arange(2 * 5 * 40 * 7, dtype=torch.float32).reshape(2, 5, 40, 7)
    ref, ref_slicer = pad_nd_image(x, (16, 32, 12), "constant", {"value": 0}, True, None)
    ours, crop = pad_to_patch(x, (16, 32, 12))
    assert torch.equal(ours, ref) and tuple(ref_slicer[1:]) == crop
