"""Real patches: tiles cut from real input volumes after nnU-Net's preprocessing, for ONNX comparison,
INT8 calibration and `trtseg compare`."""
from __future__ import annotations

import numpy as np
import torch

from trtseg.dataset import list_cases
from trtseg.model import NnUNetModel
from trtseg.preprocess import preprocess
from trtseg.read import read_case
from trtseg.window import plan_window


def sample_patches(model: NnUNetModel, input_url: str | None, n: int, seed: int = 0, step_size: float = 0.5,
                   storage_options=None, cases=None) -> np.ndarray:
    """Up to ``n`` tiles (n, c, z, y, x) float32 from the cases of ``input_url`` (or the given ``cases``), spread
    over cases, preferring tiles that are mostly inside the body (more than half nonzero before normalization is
    not known here, so tiles are ranked by their variance)."""
    rng = np.random.default_rng(seed)
    if cases is None:
        cases = [c for c in list_cases(input_url, model.num_image_channels, storage_options) if not c.problem]
    if not cases:
        raise FileNotFoundError(f"{input_url}: no usable cases to sample patches from")
    per_case = max(1, int(np.ceil(n / len(cases))))
    out = []
    for case in cases:
        pre = preprocess(read_case(list(case.files), model.num_image_channels, storage_options), model, "cpu")
        padded, plan = plan_window(pre.data, model, step_size, use_mirroring=False)
        tiles = [padded[(slice(None), *plan.tile_slices(st))] for st in plan.starts]
        spread = torch.stack([t.float().var() for t in tiles]).numpy()
        order = np.argsort(-spread + rng.uniform(0, 1e-6, len(spread)))[:per_case]
        out += [tiles[i].numpy() for i in order]
    idx = rng.permutation(len(out))[:n]
    return np.stack([out[i] for i in idx]).astype(np.float32)


def random_patches(model: NnUNetModel, n: int, seed: int = 0) -> np.ndarray:
    """Standard-normal patches (n, c, z, y, x): the input distribution after z-score normalization."""
    return np.random.default_rng(seed).standard_normal((n, model.num_input_channels, *model.patch_size)).astype(np.float32)
