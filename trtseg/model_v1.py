"""nnU-Net v1 trained model folders, read into the same NnUNetModel as v2 folders.

A v1 folder is the trainer's output folder, e.g. .../3d_fullres/Task042_X/nnUNetTrainerV2__nnUNetPlansv2.1/:
  plans.pkl                                 the pickled plans (numpy arrays inside)
  fold_N/model_final_checkpoint.model       torch checkpoint: {'epoch', 'state_dict', 'optimizer_state_dict', ...}
  fold_N/model_final_checkpoint.model.pkl   pickled {'init': trainer init args, 'name': trainer class, 'plans': ...}
As nnU-Net v1's restore_model does, the plans and the stage come from the .model.pkl (init args[5] is the stage);
plans.pkl is the fallback. The network is trtseg.generic_unet.GenericUNet, built from the stage's
pool_op_kernel_sizes and conv_kernel_sizes; no `nnunet` package is needed.

What v1 does differently from v2 at inference, and how the NnUNetModel records it (``nnunet_version = 1``):
  - each tile's softmax probabilities (averaged over mirrorings) are aggregated, not logits; the Gaussian is float32
    with maximum 1 (v2: float16, maximum 10);
  - the export resampling decides the separate-z axis from the original spacing first, then the target spacing
    (v2: the other way round);
  - 'nonCT' z-scoring divides by std + 1e-8 (v2: max(std, 1e-8)).
Everything else (crop to nonzero, resampling rules and orders, CT clipping and normalization, tile steps and
padding, mirroring axes (0, 1, 2), fold averaging, argmax) is the same as v2's, and shared.
"""
from __future__ import annotations

import hashlib
import io
import pickle
from typing import Any

import numpy as np
import torch

from trtseg import postprocess, storage
from trtseg.errors import ModelFolderError
from trtseg.model import LabelScheme, NnUNetModel, detect_folds

V1_CHECKPOINT = "model_final_checkpoint"
NORMALIZATION = {"CT": "CTNormalization", "nonCT": "ZScoreNormalizationV1", "noNorm": "NoNormalization"}


def is_v1_folder(folder: str) -> bool:
    """True when ``folder`` looks like a v1 trainer output folder (plans.pkl, or fold_N/*.model)."""
    fs, path = storage.filesystem(folder)
    try:
        if fs.exists(f"{path.rstrip('/')}/plans.pkl"):
            return True
        return bool(fs.glob(f"{path.rstrip('/')}/fold_*/*.model"))
    except Exception:
        return False


def _unpickle(url: str, where: str) -> Any:
    try:
        return pickle.loads(storage.read_bytes(url))  # model folders are trusted like code, as nnU-Net trusts them
    except FileNotFoundError:
        raise ModelFolderError(where, f"missing {url.rsplit('/', 1)[-1]}") from None
    except Exception as e:
        raise ModelFolderError(url, f"cannot unpickle ({type(e).__name__}: {e})") from None


def _plain(v: Any) -> Any:
    """numpy scalars and arrays in v1 plans -> Python numbers and lists (JSON-able, hashable by json.dumps)."""
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, dict):
        return {(k.item() if isinstance(k, np.generic) else k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def v2_view(plans: dict, stage: int, where: str) -> tuple[dict, dict, dict]:
    """(plans, configuration, dataset_json) in v2's vocabulary, for the shared pipeline, from v1 ``plans``."""
    try:
        sp = plans["plans_per_stage"][stage]
        n_mod = int(plans["num_modalities"])
        schemes = [plans["normalization_schemes"][c] for c in range(n_mod)]
        unknown = [s for s in schemes if s not in NORMALIZATION]
        if unknown:
            raise ModelFolderError(where, f"v1 normalization {unknown} is not supported (CT, nonCT, noNorm are)")
        intensity = plans["dataset_properties"].get("intensityproperties") or {}
        configuration: dict[str, Any] = {
            "patch_size": [int(p) for p in sp["patch_size"]],
            "spacing": [float(s) for s in sp["current_spacing"]],
            "normalization_schemes": [NORMALIZATION[s] for s in schemes],
            "use_mask_for_norm": [bool(plans["use_mask_for_norm"][c]) for c in range(n_mod)],
            "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        }
        export = plans.get("segmentation_export_params")
        if export:  # a v1 plans override of the export resampling
            configuration["resampling_fn_probabilities_kwargs"].update(
                {"force_separate_z": export.get("force_separate_z"), "order": int(export.get("interpolation_order", 1)),
                 "order_z": int(export.get("interpolation_order_z", 0))})
        v2_plans = {
            "transpose_forward": [int(i) for i in plans.get("transpose_forward") or (0, 1, 2)],
            "transpose_backward": [int(i) for i in plans.get("transpose_backward") or (0, 1, 2)],
            "foreground_intensity_properties_per_channel": {
                str(c): {"mean": float(p["mean"]), "std": float(p["sd"]), "percentile_00_5": float(p["percentile_00_5"]),
                         "percentile_99_5": float(p["percentile_99_5"])} for c, p in intensity.items() if p},
            "configurations": {"3d_fullres": configuration},
        }
        classes = [int(c) for c in plans["all_classes"]]
        dataset_json = {"channel_names": {str(c): str(plans.get("modalities", {}).get(c, f"ch{c}")) for c in range(n_mod)},
                        "labels": {"background": 0, **{f"label_{c}": c for c in classes}}, "file_ending": ".nii.gz"}
        if len(classes) != int(plans["num_classes"]):
            raise ModelFolderError(where, f"v1 plans list {len(classes)} classes but num_classes is {plans['num_classes']}")
        return v2_plans, configuration, dataset_json
    except KeyError as e:
        raise ModelFolderError(where, f"v1 plans lack {e} (stage {stage})") from None


def generic_unet_kwargs(plans: dict, stage: int) -> dict:
    sp = plans["plans_per_stage"][stage]
    return {"input_channels": int(plans["num_modalities"]), "base_num_features": int(plans["base_num_features"]),
            "num_classes": int(plans["num_classes"]) + 1,
            "pool_op_kernel_sizes": [[int(v) for v in p] for p in sp["pool_op_kernel_sizes"]],
            "conv_kernel_sizes": [[int(v) for v in k] for k in sp["conv_kernel_sizes"]],
            "conv_per_stage": int(plans.get("conv_per_stage", 2))}


def load_v1_model_folder(folder: str, folds: list[str] | None = None, checkpoint: str = V1_CHECKPOINT):
    """Loads an nnU-Net v1 trainer output folder as an NnUNetModel (``nnunet_version`` 1).

    checkpoint: the checkpoint's base name, model_final_checkpoint (default) or model_best
    """
    folder = str(folder).rstrip("/")
    checkpoint = checkpoint.removesuffix(".model")
    if folds is None:
        folds = detect_folds(folder, checkpoint + ".model")
        if not folds:
            raise ModelFolderError(folder, f"no fold_N/{checkpoint}.model found")
    folds = [str(f) for f in folds]
    digest = hashlib.sha256()
    weights: dict[str, dict[str, torch.Tensor]] = {}
    plans = stage = trainer = None
    for f in folds:
        base = storage.join(folder, f"fold_{f}", checkpoint + ".model")
        info = _unpickle(base + ".pkl", folder)
        if not isinstance(info, dict) or "init" not in info or "name" not in info:
            raise ModelFolderError(base + ".pkl", "not an nnU-Net v1 checkpoint info file (needs 'init' and 'name')")
        this_stage = info["init"][5] if len(info["init"]) > 5 else None
        if plans is None:
            plans = info.get("plans") or _unpickle(storage.join(folder, "plans.pkl"), folder)
            stage, trainer = this_stage, str(info["name"])
        elif (this_stage, str(info["name"])) != (stage, trainer):
            raise ModelFolderError(base, f"fold {f} was trained as {info['name']} stage {this_stage}, "
                                         f"fold {folds[0]} as {trainer} stage {stage}; folds must agree")
        try:
            ckpt = torch.load(io.BytesIO(storage.read_bytes(base)), map_location="cpu", weights_only=False)
        except FileNotFoundError:
            raise ModelFolderError(folder, f"missing checkpoint {base}") from None
        except Exception as e:
            raise ModelFolderError(base, f"cannot load checkpoint ({type(e).__name__}: {e})") from None
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
            raise ModelFolderError(base, "not an nnU-Net v1 checkpoint: no 'state_dict'")
        weights[f] = {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
        for k in sorted(weights[f]):
            digest.update(k.encode())
            digest.update(weights[f][k].detach().cpu().contiguous().numpy().tobytes())
    assert plans is not None
    if stage is None:
        if len(plans["plans_per_stage"]) != 1:
            raise ModelFolderError(folder, "the checkpoint names no stage and the plans have several")
        stage = next(iter(plans["plans_per_stage"]))
    stage = int(stage)
    if len(plans["plans_per_stage"][stage]["patch_size"]) != 3:
        raise ModelFolderError(folder, "this v1 model is 2-D; trtseg runs 3-D models")
    v2_plans, configuration, dataset_json = v2_view(plans, stage, folder)
    arch = {"generic_unet_v1": generic_unet_kwargs(plans, stage)}
    digest.update(repr(sorted(_plain(plans).items(), key=lambda kv: str(kv[0]))).encode())
    # v1's predict_cases applies the folder's postprocessing.json by default (disable_postprocessing=False)
    pp_url = storage.join(folder, "postprocessing.json")
    pp = postprocess.load_v1(pp_url) if storage.exists(pp_url) else postprocess.NONE
    return NnUNetModel(folder=folder, plans=v2_plans, dataset_json=dataset_json, configuration_name=f"v1_stage{stage}",
                       configuration=configuration, labels=LabelScheme.from_dataset_json(dataset_json, folder),
                       trainer_name=trainer or "nnUNetTrainerV2", mirror_axes=(0, 1, 2), fold_weights=weights,
                       checkpoint_name=checkpoint, fingerprint=digest.hexdigest()[:16], _arch=arch, nnunet_version=1,
                       postprocessing=pp)
