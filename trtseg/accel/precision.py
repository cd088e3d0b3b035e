"""Reduced precision: FP16 and INT8 ONNX artefacts, each with its accuracy report against FP32.

FP16 is exported directly (trtseg.accel.onnx_export: convolutions in float16, normalizations in float32).

INT8 is explicit quantization: QuantizeLinear/DequantizeLinear pairs in the graph, symmetric int8 (zero point 0,
what TensorRT's explicit quantization takes), per-channel weights, activations calibrated on patches cut from real
input volumes the user points to. We use ONNX Runtime's quantization tools: onnxruntime is already a dependency,
they calibrate on the CPU (so CI and GPU-less build hosts can make the artefact), and the Q/DQ graph they write
is the format TensorRT 10/11 build from (TensorRT 11 has no implicit INT8 calibrators any more). nvidia-modelopt
does the same with more algorithms but needs a CUDA torch; it remains an option for users who have one.

The accuracy report runs the full pipeline (preprocess, sliding window, export) on calibration cases twice, FP32
and reduced, and compares the masks: voxel agreement and Dice per label. ``max_dice_drop`` refuses an artefact
whose mean Dice against FP32 is lower than 1 - max_dice_drop for any label.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any, Callable

import numpy as np

from trtseg import storage
from trtseg.errors import TrtsegError


def quantize_int8(fp32_onnx_url: str, out_url: str, calibration: np.ndarray, method: str = "minmax") -> None:
    """Writes a Q/DQ INT8 graph of ``fp32_onnx_url`` to ``out_url``, calibrated on ``calibration`` (n, c, z, y, x)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    from trtseg.accel.onnx_export import INPUT, local_copy

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    if method not in methods:
        raise ValueError(f"calibration method must be one of {sorted(methods)}")

    class Patches(CalibrationDataReader):
        def __init__(self):
            self._it = iter(calibration)

        def get_next(self):
            x = next(self._it, None)
            return None if x is None else {INPUT: x[None].astype(np.float32)}

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, os.path.basename(out_url))
        src = local_copy(fp32_onnx_url, tmp)
        quantize_static(src, out, Patches(), quant_format=QuantFormat.QDQ,
                        use_external_data_format=os.path.exists(src + ".data"),
                        op_types_to_quantize=["Conv", "ConvTranspose"], per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=methods[method],
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                       "QDQOpTypePerChannelSupportToAxis": {"ConvTranspose": 1}})
        storage.write_bytes_atomic(out_url, open(out, "rb").read())
        if os.path.exists(out + ".data"):
            storage.write_bytes_atomic(out_url + ".data", open(out + ".data", "rb").read())


def dice_per_label(a: np.ndarray, b: np.ndarray, labels) -> dict[str, float]:
    """Dice of each label between two masks (1.0 where the label is absent from both)."""
    out = {}
    for lab in labels:
        x, y = a == lab, b == lab
        denom = int(x.sum()) + int(y.sum())
        out[str(lab)] = 1.0 if denom == 0 else 2.0 * int((x & y).sum()) / denom
    return out


# (engines, an image read by trtseg.read.read_case) -> its mask (z, y, x): the pipeline's whole case, which the
# caller supplies (trtseg.predict.Predictor), so that this module needs nothing above the engines
PredictMask = Callable[[list, Any], np.ndarray]


def accuracy_report(model, reference_engines, test_engines, cases, predict_mask: PredictMask) -> dict:
    """Masks of ``cases`` with the reference (FP32) engines and the test engines, compared case by case."""
    from trtseg.read import read_case

    per_case = []
    for case in cases:
        image = read_case(list(case.files), model.num_image_channels)
        a = predict_mask(reference_engines, image)
        b = predict_mask(test_engines, image)
        labels = model.labels.regions_class_order or model.labels.foreground_labels
        per_case.append({"case": case.case_id, "voxel_agreement": float((a == b).mean()),
                         "dice": dice_per_label(a, b, labels)})
    labels = sorted({k for c in per_case for k in c["dice"]}, key=int)
    mean_dice = {k: float(np.mean([c["dice"][k] for c in per_case])) for k in labels}
    return {"cases": per_case, "mean_dice_vs_fp32": mean_dice,
            "min_voxel_agreement": float(min(c["voxel_agreement"] for c in per_case)) if per_case else None}


def _required(predict_mask: PredictMask | None) -> PredictMask:
    if predict_mask is None:
        raise ValueError("an FP16/INT8 accuracy report needs predict_mask (whole cases through the pipeline)")
    return predict_mask


def gate(report: dict, max_dice_drop: float | None) -> tuple[bool, str]:
    """(accepted, reason): refused when any label's mean Dice against FP32 drops by more than ``max_dice_drop``."""
    if max_dice_drop is None:
        return True, "no --max-dice-drop given"
    worst = min(report["mean_dice_vs_fp32"].items(), key=lambda kv: kv[1], default=("-", 1.0))
    drop = 1.0 - worst[1]
    if drop > max_dice_drop:
        return False, f"label {worst[0]} loses {drop:.4f} Dice against FP32, more than --max-dice-drop {max_dice_drop}"
    return True, f"largest Dice drop {drop:.4f} (label {worst[0]}) is within --max-dice-drop {max_dice_drop}"


def write_report(url: str, report: dict) -> None:
    storage.write_bytes_atomic(url, json.dumps(report, indent=2).encode())


def refuse(url: str, reason: str) -> TrtsegError:
    return TrtsegError(f"{url}: not written: {reason}")


def make_artefact(model, out_url: str, precision: str = "fp32", batch: int | None = 1, dynamic_spatial: bool = False,
                  calibration: str | None = None, calibration_cases: int = 4, calibration_method: str = "minmax",
                  n_patches: int = 4, max_dice_drop: float | None = None,
                  predict_mask: PredictMask | None = None) -> dict:
    """Exports the first fold of ``model`` to ``out_url`` at ``precision`` and writes ``out_url``.report.json.

    Every artefact is checked (onnx.checker) and compared with PyTorch FP32 through ONNX Runtime on random and,
    with ``calibration``, real patches. FP16/INT8 artefacts also get the accuracy report on ``calibration`` cases;
    when ``max_dice_drop`` refuses one, only the report is written and TrtsegError says why. ``predict_mask`` runs
    those whole cases (the CLI passes trtseg.predict's, mirroring off).
    Intermediate graphs live in a temporary folder: nothing but the artefact and its report is ever written.
    """
    from trtseg.accel.onnxruntime_engine import OnnxRuntimeEngine
    from trtseg.accel.torch_engine import TorchEngine
    from trtseg.accel.onnx_export import compare_with_pytorch, export_onnx
    from trtseg.accel.patches import random_patches, sample_patches
    from trtseg.dataset import list_cases

    if precision != "fp32" and not calibration:
        raise TrtsegError("reduced precision needs --calibration INPUT_FOLDER (real volumes: INT8 calibration "
                          "patches and the accuracy report's cases)")
    fold = model.folds[0]
    net = model.build_network(fold)
    patches = {"random": random_patches(model, n_patches, seed=0)}
    if calibration:
        patches["real"] = sample_patches(model, calibration, n_patches, seed=1)
    report: dict = {"fold": fold, "precision": precision, "model_fingerprint": model.fingerprint}
    with tempfile.TemporaryDirectory() as tmp:
        # the final file name, so that an external-data file (models over 2 GB) is recorded under the name it will have
        base = os.path.join(tmp, os.path.basename(out_url))
        exported = export_onnx(net, base, model.num_input_channels, model.patch_size, batch=batch,
                               dynamic_spatial=dynamic_spatial, precision="fp16" if precision == "fp16" else "fp32")
        candidate = base
        if precision == "int8":
            os.makedirs(os.path.join(tmp, "int8"))
            candidate = os.path.join(tmp, "int8", os.path.basename(out_url))
            quantize_int8(base, candidate, patches["real"], calibration_method)
        report["vs_pytorch_fp32"] = compare_with_pytorch(net, candidate, patches)
        if precision != "fp32":
            cases = [c for c in list_cases(calibration, model.num_image_channels) if not c.problem][:calibration_cases]
            acc = accuracy_report(model, [TorchEngine(net, "cpu")],
                                  [OnnxRuntimeEngine(candidate, "cpu", model.labels.num_heads)], cases,
                                  _required(predict_mask))
            report["accuracy_vs_fp32"] = acc
            ok, why = gate(acc, max_dice_drop)
            report["accepted"], report["gate"] = ok, why
            if not ok:
                write_report(out_url + ".report.json", report)
                raise refuse(out_url, why)
        raw = open(candidate, "rb").read()
        report["onnx"] = {"url": out_url, "sha256": hashlib.sha256(raw).hexdigest(),
                          "size_bytes": len(raw), "input_shape": list(exported.input_shape),
                          "external_data": exported.external_data}
        if os.path.exists(candidate + ".data"):  # weights beside the graph, for models over 2 GB
            storage.write_bytes_atomic(out_url + ".data", open(candidate + ".data", "rb").read())
        storage.write_bytes_atomic(out_url, raw)
    write_report(out_url + ".report.json", report)
    return report
