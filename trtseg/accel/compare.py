"""`trtseg compare`: the same real patches through two engines or precisions, and how far apart they are.

An engine is named in EngineSpec's syntax, ``KIND[:TOKEN+...]`` (torch:fp32, onnxruntime:fp16,
torch:fp16+compile+channels-last, ...; trtseg/options.py), or given as a file
(``path.onnx``, run by ONNX Runtime; ``path.engine``, run by TensorRT). It is how users check an engine before
trusting it.
"""
from __future__ import annotations

import numpy as np
import torch

from trtseg.accel.engine import Engine
from trtseg.accel.engines import create_engines
from trtseg.accel.onnxruntime_engine import OnnxRuntimeEngine
from trtseg.accel.onnx_export import compare_outputs
from trtseg.accel.precision import dice_per_label


def engine_from_spec(spec: str, model, device: str, cache_url: str | None, fold: str, base=None) -> Engine:
    """The engine ``spec`` names, for ``fold`` of ``model``; an EngineSpec text is read over ``base`` (an
    EngineSpec: its calibration options serve an fp8/int8 engine)."""
    if spec.endswith(".onnx"):
        return OnnxRuntimeEngine(spec, device, model.labels.num_heads)
    if spec.endswith(".engine"):
        from trtseg.accel.tensorrt_build import BuildSpec, check_engine_fits, check_target, current_target, engine_file_meta
        from trtseg.accel.tensorrt_runtime import TensorRTEngine
        from trtseg import storage

        meta = engine_file_meta(spec)
        check_engine_fits(meta, model, spec)
        check_target(meta, current_target(BuildSpec()), spec)
        return TensorRTEngine(storage.read_bytes(spec), device)
    from trtseg.options import EngineSpec
    parsed = EngineSpec.parse(spec, base or EngineSpec(device=device, cache=cache_url))
    return create_engines(model.with_folds([fold]), parsed)[0]


@torch.inference_mode()
def compare_engines(a: Engine, b: Engine, patches: np.ndarray, labels, batch_size: int = 2) -> dict:
    """Errors of ``b`` against ``a`` on ``patches`` (n, c, z, y, x), and Dice per label of their argmax masks."""
    outs_a, outs_b = [], []
    for i in range(0, len(patches), batch_size):
        x = torch.from_numpy(patches[i:i + batch_size])
        outs_a.append(a.infer(x.to(a.device)).cpu().numpy())
        outs_b.append(b.infer(x.to(b.device)).cpu().numpy())
    ra, rb = np.concatenate(outs_a), np.concatenate(outs_b)
    report = compare_outputs(ra, rb)
    report["dice_per_label"] = dice_per_label(ra.argmax(1), rb.argmax(1), labels)
    report["patches"] = int(len(patches))
    return report
