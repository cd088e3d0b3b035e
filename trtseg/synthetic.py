"""Synthetic nnU-Net v2 model folders, CT-like volumes and DICOM series, for tests, benchmarks and the generated demo.

The model folders are byte-for-byte what nnU-Net's trainer writes (plans.json, dataset.json,
fold_N/checkpoint_final.pth with network_weights, trainer_name, init_args, inference_allowed_mirroring_axes), with
seeded random weights. The last layer is rescaled so that every label appears in the masks: raw random weights
give nearly constant argmaxes, which would make mask comparisons meaningless.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import nibabel as nib
import numpy as np
import torch

PLAIN = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
RESENC = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"


def plans_dict(patch_size: Sequence[int] = (32, 32, 32), spacing: Sequence[float] = (1.0, 1.0, 1.0),
               features: Sequence[int] = (8, 16, 32), arch: str = "PlainConvUNet",
               normalization: Sequence[str] = ("CTNormalization",), use_mask_for_norm: Sequence[bool] = (False,),
               transpose_forward: Sequence[int] = (0, 1, 2), resampling: str = "default",
               configuration: str = "3d_fullres", inherit: bool = False) -> dict:
    n, dim = len(features), len(patch_size)  # dim 2: a 2d configuration (Conv2d, patch and spacing (y, x))
    strides = [[1] * dim] + [[2] * dim] * (n - 1)
    kernels = [[3] * dim] * n
    arch_kwargs = {
        "n_stages": n, "features_per_stage": list(features),
        "conv_op": f"torch.nn.modules.conv.Conv{dim}d", "kernel_sizes": kernels, "strides": strides,
        ("n_conv_per_stage" if arch == "PlainConvUNet" else "n_blocks_per_stage"): [2] * n if arch == "PlainConvUNet" else [1] + [2] * (n - 1),
        "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
        "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
    }
    if resampling == "torch":
        res = {"resampling_fn_data": "resample_torch_fornnunet",
               "resampling_fn_data_kwargs": {"is_seg": False, "force_separate_z": None, "memefficient_seg_resampling": False},
               "resampling_fn_seg": "resample_torch_fornnunet",
               "resampling_fn_seg_kwargs": {"is_seg": True, "force_separate_z": None, "memefficient_seg_resampling": False},
               "resampling_fn_probabilities": "resample_torch_fornnunet",
               "resampling_fn_probabilities_kwargs": {"is_seg": False, "force_separate_z": None, "memefficient_seg_resampling": False}}
    else:
        res = {"resampling_fn_data": "resample_data_or_seg_to_shape",
               "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
               "resampling_fn_seg": "resample_data_or_seg_to_shape",
               "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
               "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
               "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}}
    base = {
        "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": list(patch_size), "median_image_size_in_voxels": [64, 64, 64], "spacing": list(spacing),
        "normalization_schemes": list(normalization), "use_mask_for_norm": list(use_mask_for_norm), **res,
        "architecture": {"network_class_name": PLAIN if arch == "PlainConvUNet" else RESENC, "arch_kwargs": arch_kwargs,
                         "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
        "batch_dice": False,
    }
    tb = [int(i) for i in np.argsort(transpose_forward)]
    configs = {configuration: base}
    if inherit:  # a child configuration that overrides one key, as nnU-Net's 3d_cascade_fullres / custom configs do
        configs["3d_fullres"] = {**base, "patch_size": [p * 2 for p in patch_size]}
        configs[configuration] = {"inherits_from": "3d_fullres", "patch_size": list(patch_size)}
    n_ch = len(normalization)
    return {
        "dataset_name": "Dataset999_Synthetic", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": ([1.0] if dim == 2 else []) + list(spacing),
        "original_median_shape_after_transp": [64, 64, 64],
        "image_reader_writer": "SimpleITKIO", "transpose_forward": list(transpose_forward), "transpose_backward": tb,
        "configurations": configs, "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            str(c): {"max": 1500.0, "mean": 80.0, "median": 60.0, "min": -1000.0, "percentile_00_5": -950.0,
                     "percentile_99_5": 1200.0, "std": 300.0} for c in range(n_ch)},
    }


def dataset_dict(num_channels: int = 1, num_labels: int = 3, regions: bool = False) -> dict:
    if regions:
        labels = {"background": 0, "whole": [1, 2], "core": 2}
        extra = {"regions_class_order": [1, 2]}
    else:
        labels = {"background": 0, **{f"label{i}": i for i in range(1, num_labels)}}
        extra = {}
    return {"channel_names": {str(c): ("CT" if c == 0 else f"MR{c}") for c in range(num_channels)}, "labels": labels,
            "numTraining": 10, "file_ending": ".nii.gz", **extra}


def build_network(plans: dict, dataset_json: dict, configuration: str = "3d_fullres") -> torch.nn.Module:
    from trtseg.model import LabelScheme, architecture, resolve_configuration, _locate
    cfg = resolve_configuration(plans, configuration, "<synthetic>")
    arch = architecture(cfg, "<synthetic>")
    kw = dict(arch["arch_kwargs"])
    for k in arch["_kw_requires_import"]:
        if kw.get(k) is not None:
            kw[k] = _locate(kw[k], "<synthetic>")
    labels = LabelScheme.from_dataset_json(dataset_json, "<synthetic>")
    extra = len(labels.foreground_labels) if cfg.get("previous_stage") else 0  # a cascade's one-hot channels
    return _locate(arch["network_class_name"], "")(input_channels=len(dataset_json["channel_names"]) + extra,
                                                   num_classes=labels.num_heads, deep_supervision=False, **kw)


def _spread_logits(net: torch.nn.Module, plans: dict, channels: int, logit_scale: float, seed: int) -> None:
    """Centres and scales the last layer so that every output channel wins somewhere on CT-like input."""
    patch = next(iter(plans["configurations"].values()))["patch_size"]
    dim = len(patch)
    vol = ct_like_volume(list(patch[::-1]) + ([3] if dim == 2 else []), seed=seed).T  # (z, y, x), 3-D either way
    vol = vol[1] if dim == 2 else vol  # a 2d model's patch: the middle slice
    x = torch.from_numpy((np.clip(vol, -950, 1200) - 80.0) / 300.0).float()[None, None].repeat(1, channels, *[1] * dim)
    first = [m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))][0]
    if first.in_channels > channels:  # a cascade: one-hot channels of a previous stage, here from the intensity
        onehot = [(x[:, :1] > t).float() for t in np.linspace(-0.5, 1.5, first.in_channels - channels)]
        x = torch.cat([x, *onehot], dim=1)
    last = [m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))][-1]
    spatial = tuple(range(2, 2 + dim))
    with torch.no_grad():
        out = net.eval()(x)
        mu, sd = out.mean(dim=(0, *spatial)), out.std(dim=(0, *spatial))
        scale = logit_scale / float(sd.mean())
        last.weight.mul_(scale)
        last.bias.copy_((last.bias - mu) * scale)


def write_model_folder(folder: str, plans: dict, dataset_json: dict, weights: dict, configuration: str = "3d_fullres",
                       mirror_axes: Sequence[int] | None = (0, 1, 2), trainer_name: str = "nnUNetTrainer") -> str:
    """Writes an nnU-Net v2 trained-model folder as nnU-Net's trainer does: plans.json, dataset.json and, per fold of
    ``weights`` (fold -> state dict), fold_N/checkpoint_final.pth. Returns ``folder``."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "plans.json"), "w") as f:
        json.dump(plans, f, indent=2)
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump(dataset_json, f, indent=2)
    for fold, state in weights.items():
        ckpt = {
            "network_weights": state, "optimizer_state": None, "grad_scaler_state": None,
            "logging": {}, "_best_ema": None, "current_epoch": 1000,
            "init_args": {"plans": plans, "configuration": configuration, "fold": fold, "dataset_json": dataset_json,
                          "device": "cpu"},
            "trainer_name": trainer_name,
            "inference_allowed_mirroring_axes": tuple(mirror_axes) if mirror_axes is not None else None,
        }
        os.makedirs(os.path.join(folder, f"fold_{fold}"), exist_ok=True)
        torch.save(ckpt, os.path.join(folder, f"fold_{fold}", "checkpoint_final.pth"))
    return folder


def make_model_folder(folder: str, folds: Sequence[int | str] = (0,), seed: int = 0, logit_scale: float = 8.0,
                      mirror_axes: Sequence[int] | None = (0, 1, 2), configuration: str = "3d_fullres",
                      dataset_json: dict | None = None, **plans_kwargs) -> str:
    """Writes an nnU-Net v2 trained-model folder with seeded random weights; returns its path."""
    plans = plans_dict(configuration=configuration, **plans_kwargs)
    ds = dataset_json or dataset_dict(num_channels=len(plans_kwargs.get("normalization", ("CT",))))
    weights = {}
    for i, fold in enumerate(folds):
        torch.manual_seed(seed + i)
        net = build_network(plans, ds, configuration)
        _spread_logits(net, plans, len(ds["channel_names"]), logit_scale, seed + i)
        weights[fold] = net.state_dict()
    return write_model_folder(folder, plans, ds, weights, configuration, mirror_axes)


def make_cascade_folders(results_dataset: str, seed: int = 0, features: Sequence[int] = (4, 8, 16),
                         fullres_patch: Sequence[int] = (24, 32, 32), fullres_spacing: Sequence[float] = (2.0, 1.0, 1.0),
                         lowres_patch: Sequence[int] = (16, 24, 24), lowres_spacing: Sequence[float] = (3.0, 1.8, 1.8),
                         dataset_json: dict | None = None) -> tuple[str, str]:
    """nnU-Net's cascade as its trainer leaves it under $nnUNet_results/DatasetNNN_Name: one plans.json with
    3d_fullres, 3d_lowres (next_stage 3d_cascade_fullres) and 3d_cascade_fullres (inherits 3d_fullres, previous_stage
    3d_lowres), and two trained-model folders with seeded random weights. Returns (lowres folder, cascade folder)."""
    plans = plans_dict(patch_size=fullres_patch, spacing=fullres_spacing, features=features)
    full = plans["configurations"]["3d_fullres"]
    plans["configurations"]["3d_lowres"] = {**full, "data_identifier": "nnUNetPlans_3d_lowres",
                                            "patch_size": list(lowres_patch), "spacing": list(lowres_spacing),
                                            "next_stage": "3d_cascade_fullres"}
    plans["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    ds = dataset_json or dataset_dict(num_channels=1, num_labels=3)
    folders = []
    for k, config in enumerate(("3d_lowres", "3d_cascade_fullres")):
        torch.manual_seed(seed + 10 * k)
        net = build_network(plans, ds, config)
        _spread_logits(net, plans, len(ds["channel_names"]), 8.0, seed + k)  # on a fullres-sized patch
        folder = os.path.join(results_dataset, f"nnUNetTrainer__nnUNetPlans__{config}")
        folders.append(write_model_folder(folder, plans, ds, {0: net.state_dict()}, config))
    return folders[0], folders[1]


def ct_like_volume(shape_xyz: Sequence[int], seed: int = 0, zero_border: int = 0) -> np.ndarray:
    """A CT-looking (x, y, z) float32 volume in HU: air, a body ellipsoid with soft tissue, organs and bone."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, int(n)) for n in shape_xyz], indexing="ij")
    vol = np.full(tuple(shape_xyz), -1000.0, dtype=np.float32)
    body = (x / 0.85) ** 2 + (y / 0.7) ** 2 + (z / 1.1) ** 2 < 1
    vol[body] = 40.0
    for _ in range(4):
        c = rng.uniform(-0.4, 0.4, 3)
        r = rng.uniform(0.12, 0.3, 3)
        organ = ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 < 1
        vol[organ & body] = rng.uniform(-100, 200)
    spine = ((x / 0.1) ** 2 + ((y + 0.45) / 0.1) ** 2 < 1) & body
    vol[spine] = 900.0
    vol += rng.normal(0, 20, vol.shape).astype(np.float32)
    if zero_border:
        b = zero_border
        vol[:b] = vol[-b:] = 0
        vol[:, :b] = vol[:, -b:] = 0
        vol[:, :, :b] = vol[:, :, -b:] = 0
    return vol


def affine_for(spacing_xyz: Sequence[float], oblique_deg: float = 0.0, origin: Sequence[float] = (0, 0, 0)) -> np.ndarray:
    """An affine with the given voxel sizes, rotated ``oblique_deg`` degrees about z and 10% of that about x."""
    a, b = np.deg2rad(oblique_deg), np.deg2rad(oblique_deg * 0.1)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    aff = np.eye(4)
    aff[:3, :3] = rz @ rx @ np.diag(spacing_xyz)
    aff[:3, 3] = origin
    return aff


def save_nifti(path: str, vol_xyz: np.ndarray, affine: np.ndarray, dtype=np.int16) -> str:
    img = nib.Nifti1Image(vol_xyz.astype(dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=2)
    nib.save(img, path)
    return path


def make_v1_model_folder(folder: str, folds: Sequence[int] = (0,), seed: int = 0, logit_scale: float = 3.0,
                         patch_size: Sequence[int] = (24, 32, 40), spacing: Sequence[float] = (2.0, 1.0, 1.0),
                         base_num_features: int = 4, pool_op_kernel_sizes=((1, 2, 2), (2, 2, 2)),
                         conv_kernel_sizes=((1, 3, 3), (3, 3, 3), (3, 3, 3)), num_classes: int = 2,
                         normalization: Sequence[str] = ("CT",), use_mask_for_norm: Sequence[bool] = (False,),
                         transpose_forward: Sequence[int] = (0, 1, 2), stage: int = 0) -> str:
    """Writes an nnU-Net v1 trainer output folder (nnUNetTrainerV2__nnUNetPlansv2.1 layout) with seeded random
    weights, in the pickled formats v1 writes: plans.pkl (numpy arrays, OrderedDicts), fold_N/
    model_final_checkpoint.model (torch.save of epoch, state_dict, optimizer/scheduler state, plot_stuff,
    best_stuff, amp_grad_scaler) and its .model.pkl (init args, trainer name and class, plans). Spacing and patch are (z, y, x) after
    transpose_forward; normalization per modality is v1's 'CT' or 'nonCT'."""
    import pickle
    from collections import OrderedDict

    from trtseg.generic_unet import GenericUNet
    os.makedirs(folder, exist_ok=True)
    n_mod = len(normalization)
    tb = [int(i) for i in np.argsort(transpose_forward)]
    intensity = OrderedDict((c, OrderedDict(median=60.0, mean=80.0, sd=300.0, mn=-1000.0, mx=1500.0,
                                            percentile_99_5=1200.0, percentile_00_5=-950.0, local_props=OrderedDict()))
                            for c in range(n_mod))
    stage_plans = {
        "batch_size": 2, "num_pool_per_axis": [int(sum(1 for p in pool_op_kernel_sizes if p[a] > 1)) for a in range(3)],
        "patch_size": np.array(patch_size), "median_patient_size_in_voxels": np.array([64, 64, 64]),
        "current_spacing": np.array(spacing, dtype=float), "original_spacing": np.array(spacing, dtype=float),
        "do_dummy_2D_data_aug": False, "pool_op_kernel_sizes": [list(p) for p in pool_op_kernel_sizes],
        "conv_kernel_sizes": [list(k) for k in conv_kernel_sizes],
    }
    classes = list(range(1, num_classes + 1))
    plans = {
        "num_stages": stage + 1, "num_modalities": n_mod, "modalities": {c: ("CT" if s == "CT" else "MR") for c, s in enumerate(normalization)},
        "normalization_schemes": OrderedDict((c, s) for c, s in enumerate(normalization)),
        "dataset_properties": {"all_sizes": [[64, 64, 64]], "all_spacings": [list(spacing)], "all_classes": classes,
                               "modalities": {c: "CT" for c in range(n_mod)}, "intensityproperties": intensity,
                               "size_reductions": OrderedDict()},
        "list_of_npz_files": [], "original_spacings": [np.array(spacing)], "original_sizes": [np.array([64, 64, 64])],
        "preprocessed_data_folder": folder, "num_classes": num_classes, "all_classes": classes,
        "base_num_features": base_num_features, "use_mask_for_norm": OrderedDict((c, bool(m)) for c, m in enumerate(use_mask_for_norm)),
        "keep_only_largest_region": None, "min_region_size_per_class": None, "min_size_per_class": None,
        "transpose_forward": list(transpose_forward), "transpose_backward": tb,
        "data_identifier": "nnUNetData_plans_v2.1", "plans_per_stage": {s: stage_plans for s in range(stage + 1)},
        "preprocessor_name": "GenericPreprocessor", "conv_per_stage": 2,
    }
    with open(os.path.join(folder, "plans.pkl"), "wb") as f:
        pickle.dump(plans, f)
    for i, fold in enumerate(folds):
        torch.manual_seed(seed + i)
        net = GenericUNet(n_mod, base_num_features, num_classes + 1, pool_op_kernel_sizes, conv_kernel_sizes)
        with torch.no_grad():
            net.seg_outputs[-1].weight.mul_(logit_scale)
        out = os.path.join(folder, f"fold_{fold}")
        os.makedirs(out, exist_ok=True)
        ckpt = {"epoch": 2, "state_dict": OrderedDict(net.state_dict()), "optimizer_state_dict": None,
                "lr_scheduler_state_dict": None, "plot_stuff": ([1.0, 0.9], [1.0, 0.9], [], [0.1, 0.2]),
                "best_stuff": (1, 0.9, 0.2),
                "amp_grad_scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                    "growth_interval": 2000, "_growth_tracker": 0}}
        torch.save(ckpt, os.path.join(out, "model_final_checkpoint.model"))
        info = OrderedDict(init=(os.path.join(folder, "plans.pkl"), fold, out, folder, False, stage, True, False, True),
                           name="nnUNetTrainerV2",
                           plans=plans)
        info["class"] = "<class 'nnunet.training.network_training.nnUNetTrainerV2.nnUNetTrainerV2'>"
        with open(os.path.join(out, "model_final_checkpoint.model.pkl"), "wb") as f:
            pickle.dump(info, f)
    return folder


def save_dicom_series(folder: str, volume_zyx: np.ndarray, spacing_zyx: Sequence[float],
                      row_dir=(1.0, 0.0, 0.0), col_dir=(0.0, 1.0, 0.0), origin=(0.0, 0.0, 0.0), slope: float = 1.0,
                      intercept: float = -1024.0, series_uid: str | None = None, modality: str = "CT", positions=None,
                      shuffle_seed: int | None = 0, description: str = "", prefix: str = "IM") -> list[str]:
    """One CT Image Storage file per slice of ``volume_zyx`` (z, y, x; values in HU), stored as int16
    (HU - intercept) / slope, as a scanner writes a series. spacing_zyx: mm. row_dir / col_dir:
    ImageOrientationPatient's (LPS) directions of x and y; slices step along their normal by spacing_zyx[0] from
    ``origin``, unless ``positions`` gives each slice's ImagePositionPatient. ``modality`` and ``description``
    (SeriesDescription) are written as given. The files (PREFIXnnnn.dcm) are named in shuffled order, as they come
    from a PACS. Returns their paths."""
    from trtseg.dicom import pydicom  # lazily: pydicom is the dicom extra

    pd = pydicom()
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    os.makedirs(folder, exist_ok=True)
    row, col = np.asarray(row_dir, float), np.asarray(col_dir, float)
    normal = np.cross(row, col)
    series_uid = series_uid or generate_uid()
    study_uid, frame_uid = generate_uid(), generate_uid()
    stored = np.round((volume_zyx - intercept) / slope).astype(np.int16)
    order = np.random.default_rng(shuffle_seed).permutation(len(stored)) if shuffle_seed is not None else \
        np.arange(len(stored))
    paths = []
    for k, z in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pd.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality, ds.PatientID, ds.PatientName = modality, "TEST", "Test^Series"
        ds.SeriesDescription = description
        ds.StudyDate, ds.SeriesNumber, ds.InstanceNumber = "20260101", 1, int(z) + 1
        # the patient and study attributes a scanner writes (type 2: present, possibly empty)
        ds.PatientBirthDate, ds.PatientSex, ds.StudyTime, ds.StudyID = "", "O", "120000", "1"
        ds.AccessionNumber, ds.ReferringPhysicianName, ds.Manufacturer = "", "", "test"
        ds.ImageType, ds.KVP, ds.AcquisitionNumber = ["ORIGINAL", "PRIMARY", "AXIAL"], "120", 1
        ds.PatientPosition, ds.Laterality, ds.PositionReferenceIndicator = "HFS", "", ""
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row, *col)]
        pos = positions[z] if positions is not None else np.asarray(origin, float) + normal * spacing_zyx[0] * z
        ds.ImagePositionPatient = [f"{v:.6f}" for v in pos]
        ds.PixelSpacing = [f"{spacing_zyx[1]:.6f}", f"{spacing_zyx[2]:.6f}"]  # row spacing (y), column spacing (x)
        ds.SliceThickness = f"{spacing_zyx[0]:.6f}"
        ds.Rows, ds.Columns = stored.shape[1], stored.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
        ds.PixelData = stored[z].tobytes()
        path = os.path.join(folder, f"{prefix}{k:04d}.dcm")
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
