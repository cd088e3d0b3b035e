"""Stage 2, preprocess: CaseImage -> Preprocessed, exactly nnU-Net's DefaultPreprocessor.run_case_npy.

Order, as nnU-Net: transpose_forward -> crop to the nonzero bounding box -> normalize -> resample to the plans'
spacing (nnU-Net v1 resamples before it normalizes; its z-score mask is then the resampled nonzero mask). All of it
runs on torch tensors on ``device`` (the GPU when there is one).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trtseg import resample as rs
from trtseg import transfer
from trtseg.errors import CaseError
from trtseg.model import NnUNetModel
from trtseg.read import CaseImage


@dataclass
class Preprocessed:
    """A case ready for the sliding window, and what export needs to undo each step.

    data: (c, z, y, x) float32 on the compute device, model axis order, at the model's target spacing
    shape_before_cropping: (z, y, x) after transpose_forward, before cropping
    bbox: [[z0, z1], [y0, y1], [x0, x1]] half-open crop box in that grid
    shape_after_cropping: (z, y, x) of the cropped volume, before resampling
    spacing_transposed: the image's spacing (z, y, x) after transpose_forward
    """

    data: torch.Tensor
    shape_before_cropping: tuple[int, int, int]
    bbox: list[list[int]]
    shape_after_cropping: tuple[int, int, int]
    spacing_transposed: tuple[float, float, float]


def fill_holes(mask: torch.Tensor) -> torch.Tensor:
    """scipy.ndimage.binary_fill_holes (6-connected background) for a (z, y, x) bool tensor, in torch.

    Background reachable from the border stays background; everything else is filled. Reachability spreads along
    whole runs of background per axis sweep (a segmented scan), so few sweeps are needed.
    """
    bg = ~mask
    reach = torch.zeros_like(bg)
    reach[0], reach[-1] = bg[0], bg[-1]
    reach[:, 0], reach[:, -1] = bg[:, 0], bg[:, -1]
    reach[:, :, 0], reach[:, :, -1] = bg[:, :, 0], bg[:, :, -1]
    while True:
        before = int(reach.sum())
        for dim in range(3):
            reach = _spread_along_runs(reach, bg, dim)
        if int(reach.sum()) == before:
            return ~reach


def _spread_along_runs(reach: torch.Tensor, bg: torch.Tensor, dim: int) -> torch.Tensor:
    r = reach.movedim(dim, -1).reshape(-1, reach.shape[dim])
    b = bg.movedim(dim, -1).reshape(-1, bg.shape[dim])
    n_lines, length = r.shape
    run_id = torch.cumsum((~b).to(torch.int64), dim=1)
    run_id += torch.arange(n_lines, device=r.device).unsqueeze(1) * (length + 1)
    hit = torch.zeros(n_lines * (length + 1), dtype=torch.bool, device=r.device)
    hit[run_id[r]] = True
    out = hit[run_id] & b
    shape = list(reach.movedim(dim, -1).shape)
    return out.view(shape).movedim(-1, dim)


def bbox_of(mask: torch.Tensor) -> list[list[int]]:
    """Half-open bounding box of a (z, y, x) bool mask; the whole volume when the mask is empty (as acvl_utils)."""
    box = []
    for dim in range(3):
        other = tuple(d for d in range(3) if d != dim)
        nz = torch.nonzero(mask.any(dim=other)).flatten()
        box.append([int(nz[0]), int(nz[-1]) + 1] if nz.numel() else [0, mask.shape[dim]])
    return box


def normalize(data: torch.Tensor, nonzero: torch.Tensor | None, model: NnUNetModel, where: str) -> torch.Tensor:
    """Per-channel normalization named by the plans; ``nonzero`` is the hole-filled mask (for use_mask_for_norm)."""
    out = torch.empty_like(data)
    props = model.intensity_properties
    for c, scheme in enumerate(model.normalization_schemes):
        x = data[c]
        if scheme == "CTNormalization":
            p = props.get(str(c)) or props.get(c)  # type: ignore[call-overload]
            if p is None:
                raise CaseError(where, f"plans lack foreground_intensity_properties for channel {c} (CTNormalization)")
            x = x.clamp(float(p["percentile_00_5"]), float(p["percentile_99_5"]))
            out[c] = (x - float(p["mean"])) / max(float(p["std"]), 1e-8)
        elif scheme == "ZScoreNormalization":
            if model.use_mask_for_norm[c]:
                assert nonzero is not None
                sel = x[nonzero].double()
                mean, std = float(sel.mean()) if sel.numel() else 0.0, float(sel.std(unbiased=False)) if sel.numel() else 0.0
                out[c] = torch.where(nonzero, (x - mean) / max(std, 1e-8), x)
            else:
                xd = x.double()
                out[c] = (x - float(xd.mean())) / max(float(xd.std(unbiased=False)), 1e-8)
        elif scheme == "ZScoreNormalizationV1":  # nnU-Net v1's 'nonCT': std + 1e-8, zero outside the mask
            sel = x[nonzero] if model.use_mask_for_norm[c] and nonzero is not None else x.reshape(-1)
            mean, std = (float(sel.double().mean()), float(sel.double().std(unbiased=False))) if sel.numel() else (0.0, 0.0)
            z = (x - mean) / (std + 1e-8)
            out[c] = torch.where(nonzero, z, torch.zeros_like(z)) if model.use_mask_for_norm[c] and nonzero is not None else z
        elif scheme == "NoNormalization":
            out[c] = x
        elif scheme == "RescaleTo01Normalization":
            x = x - x.min()
            out[c] = x / max(float(x.max()), 1e-8)
        elif scheme == "RGBTo01Normalization":
            if float(x.min()) < 0 or float(x.max()) > 255:
                raise CaseError(where, f"channel {c} is not RGB (values outside 0..255) but the plans use RGBTo01Normalization")
            out[c] = x / 255.0
        else:
            raise CaseError(where, f"normalization scheme {scheme!r} of the plans is not supported")
    return out


def preprocess(image: CaseImage, model: NnUNetModel, device: torch.device | str = "cpu",
               prev_stage: np.ndarray | torch.Tensor | None = None) -> Preprocessed:
    """Transpose, crop, normalize and resample one case on ``device``.

    prev_stage: a cascade model's previous-stage mask (z, y, x) on the image's grid (numpy, or a tensor on any device): transposed and cropped like
    the image, resampled with the plans' segmentation resampling and appended as one channel per foreground
    label, as nnU-Net's predictor does with -prev_stage_predictions."""
    where = image.files[0] if image.files else "<array>"
    tf = model.transpose_forward
    data = transfer.to_device(image.data, device, torch.float32)
    data = data.permute(0, *[i + 1 for i in tf]).contiguous()
    spacing = tuple(float(image.spacing_zyx[i]) for i in tf)
    shape_before = tuple(int(s) for s in data.shape[1:])

    nonzero = (data != 0).any(dim=0)
    # nnU-Net crops to the nonzero box; a card may keep (and normalize over) the whole volume
    box = bbox_of(nonzero) if model.crop_to_nonzero else [[0, int(n)] for n in nonzero.shape]
    sl = tuple(slice(a, b) for a, b in box)
    data = data[(slice(None), *sl)]
    need_mask = any(m and s.startswith("ZScoreNormalization")
                    for m, s in zip(model.use_mask_for_norm, model.normalization_schemes))
    mask = fill_holes(nonzero[sl]) if need_mask else None
    shape_after = tuple(int(s) for s in data.shape[1:])

    target = model.target_spacing(spacing)
    new_shape = rs.compute_new_shape(shape_after, spacing, target)
    spec = model.resampling_data
    plan = rs.plan_resize(spec.kind, spec.order, spec.order_z, spec.force_separate_z, spacing, target,
                          spec.anisotropy_threshold) if spec.kind != "none" else None
    onehot = None
    if prev_stage is not None:
        seg = prev_stage if isinstance(prev_stage, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(prev_stage))
        seg = seg.to(data.device).permute(*tf)[sl].to(torch.int32)
        # nnU-Net's crop_to_nonzero marks background outside the (hole-filled) nonzero mask as -1; it takes part
        # in the label-wise resampling's argmax
        inside = mask if mask is not None else fill_holes(nonzero[sl])
        seg = torch.where((seg == 0) & ~inside, torch.full_like(seg, -1), seg)
        sspec = model.resampling_seg
        if sspec.kind != "default":
            raise CaseError(where, f"a cascade with {model.configuration.get('resampling_fn_seg')} segmentation "
                                   "resampling is not supported")
        seg_plan = rs.plan_resize(sspec.kind, sspec.order, sspec.order_z, sspec.force_separate_z, spacing, target,
                                  sspec.anisotropy_threshold)
        onehot = rs.resample_seg_onehot(seg, new_shape, seg_plan, model.labels.foreground_labels)
    if model.resample_first:
        # v1 (and a card with preprocessing_order resample_then_normalize) resamples first, then normalizes; its
        # mask is the nonzero mask resampled as a segmentation (linear, nearest along a separate z, then >= 0.5)
        if plan is not None:
            data = rs.resample(data, new_shape, plan)
            if mask is not None:
                seg_plan = rs.Plan((1, 1, 1) if plan.separate_axis is None else
                                   tuple(0 if ax == plan.separate_axis else 1 for ax in range(3)),  # type: ignore[arg-type]
                                   plan.separate_axis, clip=False)
                mask = rs.resample(mask[None].float(), new_shape, seg_plan)[0] >= 0.5
        data = normalize(data, mask, model, where)
    else:
        data = normalize(data, mask, model, where)
        if plan is not None:
            data = rs.resample(data, new_shape, plan)
    if onehot is not None:
        data = torch.cat([data, onehot.to(data.dtype)])
    return Preprocessed(data=data.contiguous(), shape_before_cropping=shape_before, bbox=box,  # type: ignore[arg-type]
                        shape_after_cropping=shape_after, spacing_transposed=spacing)  # type: ignore[arg-type]
