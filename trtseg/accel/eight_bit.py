"""fp8 and int8 engines (``--precision fp8|int8``): their calibration and accuracy gate, made once per model fold,
calibration data and device type, and kept in the engine cache.

An 8-bit engine is the PyTorch engine with its convolutions replaced by ``trtseg.accel.rewrites.conv8.Conv8``: the
Triton 8-bit kernel on CUDA, and on the CPU quant8's reference (the same function in float32, slow; it is what
lets CI and GPU-less machines check a calibration). Before the first one is built:

1. calibration: the first ``--calibration-cases`` usable cases of ``--calibration`` (predict's own input by
   default, trtseg.options.Settings.for_input) give CALIBRATION_PATCHES real patches (``trtseg.accel.patches``,
   the patches ``trtseg export --calibration`` cuts); the fp32 network runs them and ``quant8.calibrate`` turns
   each layer's input range into its scale by ``--calibration-method``;
2. the report: those cases run whole through the pipeline (trtseg.predict, mirroring off) with the fp32 network and
   with the 8-bit engine the run itself then uses, as the run builds it (compiled where the run compiles); per-label
   Dice and voxel agreement against fp32 (``trtseg.accel.precision.accuracy_report``); the gate refuses the engine
   when any label's mean Dice drops by more than ``--max-dice-drop`` (``precision.gate``, the ONNX INT8 artefacts'
   rule). The gate judges the compiled engine, not an eager twin, because compiling changes the function a little:
   Inductor computes a fused chain of elementwise ops (normalization, LeakyReLU, the next layer's quantization) in
   fp32 without rounding its fp16 intermediates, so values near a quantization step can round the other way, and
   some voxels take another label (tests/test_conv8.py compares both with the float32 reference).

The scales and the report go into CACHE/calibration/<device>/<key>.json. The key holds the model fingerprint and
fold, the format, the method, the calibration cases' listing identities (a replaced volume calibrates again), the
patch shape, the number of gate cases, the device type and the engine options that change its function (compile
mode, channels-last). Every later process, actor and node loads the entry and judges its report by its own
--max-dice-drop: the same drop refuses again at once, with the same reason, and a looser one accepts without
calibrating again.
"""
from __future__ import annotations

import hashlib
import logging

import torch

from trtseg.errors import TrtsegError

log = logging.getLogger(__name__)

CALIBRATION_PATCHES = 8  # patches the scales are calibrated on, spread over the calibration cases
_JUDGED = ("engine", "device", "precision", "compiled", "compile_mode", "channels_last", "fp16_weights",
           "quantized_convolutions")  # what the report records of the engine the gate judged


def calibration_cases(spec, model, storage_options=None) -> list:
    """The first ``spec.calibration_cases`` usable cases of ``spec.calibration``; refuses, naming the folder, when
    there is none."""
    from trtseg.dataset import list_cases

    if not spec.calibration:
        raise TrtsegError(f"--precision {spec.precision} needs --calibration FOLDER: real input volumes to calibrate "
                          "the 8-bit scales on and to check the engine against fp32")
    cases = [c for c in list_cases(spec.calibration, model.num_image_channels, storage_options, allow_empty=True)
             if not c.problem][:max(spec.calibration_cases, 1)]
    if not cases:
        raise TrtsegError(f"{spec.calibration}: no case this model reads, for --precision {spec.precision}'s "
                          "calibration")
    return cases


def entry_fields(model, fold: str, spec, device: torch.device, cases) -> dict:
    """What the scales and the gate's report depend on (the module docstring's key)."""
    from trtseg.accel import quant8
    from trtseg.accel.compile_cache import device_slug

    identity = hashlib.sha256("\n".join(f"{c.case_id}:{c.identity}" for c in cases).encode()).hexdigest()[:16]
    fields = quant8.calibration_key(model.fingerprint, fold, spec.precision, spec.calibration_method, identity,
                                    model.patch_size)[1]
    return {**fields, "device": device_slug(device), "gate_cases": len(cases), "patches": CALIBRATION_PATCHES,
            "engine": {"compile": spec.compile or None, "channels_last": bool(spec.channels_last)}}


def calibrated_engine(model, fold: str, spec, device: torch.device, cache_url: str, build):
    """The 8-bit engine of ``model``'s ``fold`` for ``spec`` (precision fp8 or int8) on ``device``, with its
    calibration from the engine cache at ``cache_url`` or made now (the engine the gate ran, then) as
    ``engine.calibration``: ``summary`` of {"scales": {layer: input scale}, "accuracy_vs_fp32", "accepted", "gate",
    "entry", "from"}. Raises TrtsegError, naming the model and the cache entry, when the gate (spec.max_dice_drop)
    refuses it. build(input_scales) -> Engine: the run's engine with those scales (trtseg.accel.engines)."""
    from trtseg.accel.compile_cache import JsonEntry
    from trtseg.accel.precision import gate

    cases = calibration_cases(spec, model)
    entry = JsonEntry(cache_url, "calibration", entry_fields(model, fold, spec, device, cases), "calibration",
                      "calibration")
    made = entry.get()
    if entry.note:
        log.warning("calibration: %s", entry.note)
    source, engine = "cache", None
    if made is None:
        (made, engine), source = calibrate_and_check(model, fold, spec, device, cases, build), "calibrated"
        entry.put(made)
    accepted, why = gate(made["accuracy_vs_fp32"], spec.max_dice_drop)
    made = {**made, "accepted": accepted, "gate": why, "entry": entry.url, "from": source}
    if not accepted:
        raise TrtsegError(f"{model.folder}: --precision {spec.precision} refused: {made['gate']} on "
                          f"{len(cases)} calibration case(s) of {spec.calibration} (report: {entry.url})")
    log.info("calibration (%s) for %s fold %s: %s, %s", source, model.folder, fold, spec.precision, made["gate"])
    engine = engine if engine is not None else build(made["scales"])
    engine.calibration = summary(made)
    return engine


def summary(made: dict) -> dict:
    """What the run report and `trtseg compare` show of a calibration: everything but the scales themselves."""
    return {k: v for k, v in made.items() if k != "scales"}


def calibrate_and_check(model, fold: str, spec, device: torch.device, cases, build) -> tuple[dict, object]:
    """Calibrates the scales on ``cases``' patches and makes the gate's report (steps 1 and 2 of the module
    docstring); returns them and the 8-bit engine the report judged. ``build`` as in ``calibrated_engine``."""
    from trtseg.accel import quant8
    from trtseg.accel.patches import sample_patches
    from trtseg.accel.precision import accuracy_report
    from trtseg.accel.torch_engine import TorchEngine
    # the gate predicts whole cases through the pipeline's stages, as export's accuracy report does
    from trtseg.pipeline import mask_predictor

    one = model.with_folds([fold])
    patches = torch.from_numpy(sample_patches(model, None, CALIBRATION_PATCHES, seed=1, cases=cases)).to(device)
    network = model.build_network(fold).to(device).eval()
    scales = quant8.calibrate(network, patches, spec.precision, spec.calibration_method,
                              batch=max(spec.batch_size, 1))
    del patches
    fp32 = [TorchEngine(network, device, "fp32")]
    engine = build(scales)
    report = accuracy_report(one, fp32, [engine], cases, mask_predictor(one, device))
    return {"scales": scales, "method": spec.calibration_method, "calibration": spec.calibration,
            "cases": [c.case_id for c in cases], "accuracy_vs_fp32": report,
            "engine": {k: v for k, v in engine.describe().items() if k in _JUDGED}}, engine
