"""Stage 6, export: logits at the model's spacing -> the mask on the input's voxel grid, as nnU-Net's
convert_predicted_logits_to_segmentation_with_correct_shape (v1: save_segmentation_nifti_from_softmax, which gets
aggregated probabilities instead of logits; resampling and argmax are the same).

resample logits to the cropped shape (the plans' probability resampling: order 1, separate-z rule) -> argmax, or
sigmoid > 0.5 painted in regions_class_order -> paste into the crop box -> transpose_backward.
Runs on the logits' device; only the final mask (and probabilities, on request) comes to the host.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trtseg import resample as rs
from trtseg import transfer
from trtseg.model import LabelScheme, NnUNetModel
from trtseg.preprocess import Preprocessed


@dataclass
class Exported:
    """mask: (z, y, x) in the input file's axis order, uint8 or uint16.
    probabilities: (k, z, y, x) float32 like nnU-Net's .npz (1 for background outside the crop box), or None."""

    mask: np.ndarray
    probabilities: np.ndarray | None = None


def labels_of_probabilities(probabilities: torch.Tensor, labels: LabelScheme) -> torch.Tensor:
    """nnU-Net's convert_probabilities_to_segmentation: (k, z, y, x) probabilities -> (z, y, x) int32 labels: the
    argmax, or for regions each region's label painted where its probability exceeds 0.5, in regions_class_order."""
    if not labels.has_regions:
        return torch.argmax(probabilities, dim=0).to(torch.int32)
    seg = torch.zeros(probabilities.shape[1:], dtype=torch.int32, device=probabilities.device)
    for i, c in enumerate(labels.regions_class_order or ()):
        seg[probabilities[i] > 0.5] = c
    return seg


def export_on_device(logits: torch.Tensor, pre: Preprocessed, model: NnUNetModel, with_probabilities: bool = False,
                     half_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits: (k, z, y, x) float32 at the model's spacing, in the model's axis order.

    half_logits: nnU-Net's float16 numerics (--accumulate fp16, trtseg/aggregate.py): its resampling writes into
    an array of the logits' dtype, float16, so the resampled logits are rounded to float16 before the argmax.

    Returns, on the logits' device: the mask (z, y, x) in the input file's axis order, contiguous, in the mask's
    dtype (uint8, or int32 for uint16 masks), and the probabilities (k, z, y, x) float32 in that axis order (1 for
    background outside the crop box) when asked for, else None.
    """
    spec = model.resampling_probabilities
    if spec.kind != "none":
        # which spacing decides the separate-z axis first: v2 the model's, v1 the input's (save_segmentation_nifti_
        # from_softmax); the axis only, the resize itself is the same
        # v1: when the input's own spacing is not anisotropic, save_segmentation_nifti_from_softmax takes the
        # axis from the target spacing, which is in the transposed (model) order, and applies that index to a
        # softmax already transposed back to the input's order. Here the resize runs in the model's order, so
        # v1's axis j lands on the model axis that input axis j became: transpose_forward.index(j). (v1's masks
        # are the reference its users compare against; for transpose_forward [0, 1, 2] nothing changes.)
        tf = list(model.transpose_forward)
        target = model.target_spacing(pre.spacing_transposed)
        if model.nnunet_version == 1:
            first, second, axis_map = pre.spacing_transposed, target, [tf.index(j) for j in range(3)]
        else:
            first, second, axis_map = target, pre.spacing_transposed, None
        plan = rs.plan_resize(spec.kind, spec.order, spec.order_z, spec.force_separate_z, first, second,
                              spec.anisotropy_threshold, axis_map)
        logits = rs.resample(logits.float(), pre.shape_after_cropping, plan)
        if half_logits:
            logits = logits.half().float()
    labels = model.labels
    probs = None
    if labels.has_regions:
        probs = torch.sigmoid(logits)
        seg = labels_of_probabilities(probs, labels)
    else:
        seg = torch.argmax(logits, dim=0).to(torch.int32)  # the argmax of logits is that of their softmax
        if with_probabilities:
            probs = torch.softmax(logits, dim=0)
    # the mask gets its file's dtype on the device: a quarter of int32's bytes cross to the host, and no host cast
    dtype = torch.uint8 if labels.mask_dtype == "uint8" else torch.int32
    full = torch.zeros(pre.shape_before_cropping, dtype=dtype, device=seg.device)
    box = tuple(slice(a, b) for a, b in pre.bbox)
    full[box] = seg.to(dtype)
    mask = full.permute(*model.transpose_backward).contiguous()
    if not with_probabilities:
        return mask, None
    assert probs is not None
    fullp = torch.zeros((probs.shape[0], *pre.shape_before_cropping), dtype=torch.float32, device=probs.device)
    if not labels.has_regions:
        fullp[0] = 1.0
    fullp[(slice(None), *box)] = probs
    return mask, fullp.permute(0, *[i + 1 for i in model.transpose_backward])


def exported_on_host(mask: torch.Tensor, probabilities: torch.Tensor | None, model: NnUNetModel) -> Exported:
    """export_on_device's results as an Exported (the copies to the host, through pinned memory on a GPU; both
    arrays come back C-contiguous)."""
    out = transfer.to_host(mask).astype(model.labels.mask_dtype, copy=False)
    probs = transfer.to_host(probabilities) if probabilities is not None else None
    return Exported(mask=out, probabilities=probs)


def export(logits: torch.Tensor, pre: Preprocessed, model: NnUNetModel, with_probabilities: bool = False) -> Exported:
    """logits: (k, z, y, x) float32 at the model's spacing, in the model's axis order -> the mask on the host."""
    return exported_on_host(*export_on_device(logits, pre, model, with_probabilities), model)


def empty_export(shape_zyx, model: NnUNetModel, with_probabilities: bool = False) -> Exported:
    """The all-background result for a volume with no nonzero voxel: nothing to segment, no network run."""
    mask = np.zeros(tuple(shape_zyx), dtype=model.labels.mask_dtype)
    probs = None
    if with_probabilities:
        probs = np.zeros((model.labels.num_heads, *shape_zyx), dtype=np.float32)
        if not model.labels.has_regions:
            probs[0] = 1.0
    return Exported(mask=mask, probabilities=probs)
