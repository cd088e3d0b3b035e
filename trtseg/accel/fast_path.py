"""The default engine: the fastest path that has been checked for the model at hand, without flags.

On CUDA with the PyTorch engine, ``choose`` turns on what applies among FAST_PARTS: torch.compile, channels-last-3d
layouts, fp16 weights with fp32 normalizations, and the network rewrites (width-folded convolutions, merged
upsampling, Triton-fused normalizations). A part that cannot apply is left off with one log line that says why
(no Triton, a 2d network, a precision other than fp16, a network the rewrite finds nothing to rewrite in). The
result is then checked once against the plain fp32 network, as the FP16/INT8 artefacts are gated
(trtseg.accel.precision): its masks must agree on >= 99.9 % of the voxels of check patches, or on at least as many
as fp16 autocast's masks do (see ``_check``). A path that fails the check is not used: the engine falls back to fp16
autocast without rewrites (nnU-Net's own), and says so.

On the CPU (engine "auto"), ONNX Runtime and PyTorch fp32 are both built, checked against each other on the same
patches, and timed on them; the faster one runs. Which is faster depends on the CPU and the network (on a 2-core
x86-64 CPU the small test model ran 1.41 s a case on PyTorch against 1.56 s on ONNX Runtime,
benchmarks/results/cpu2core_vs_nnunet.json), so it is measured, not assumed.

Each verdict is kept in the engine cache, on any fsspec URL, so that the check runs once per device type and model:

    CACHE/fast_path/<device>/<key>.json

keyed like the compile cache (trtseg/accel/compile_cache.py): the device, torch, Triton and CUDA versions, the
model fingerprint, the patch and batch, and the requested spec. An entry that does not parse or was made for other
fields is checked again, never trusted. ``EngineSpec.fast = False`` (--no-fast) and the --no-PART flags turn the
choice off, whole or in parts; options given as flags are always kept.

Check patches: smooth random volumes (Gaussian-filtered noise scaled to zero mean and unit variance, what a z-scored
CT looks like to the network) rather than white noise, whose masks flip on a trained network's near-ties.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time

from typing import Callable

import numpy as np
import torch

from trtseg.options import EIGHT_BIT, FAST_PARTS, REWRITES, EngineSpec

log = logging.getLogger(__name__)
Builder = Callable[[EngineSpec, str, str], "object"]  # (spec, kind, fold) -> Engine

MIN_AGREEMENT = 0.999  # the FP16/INT8 artefacts' gate: masks on >= 99.9 % of voxels
#: how many more check voxels than fp16 autocast a candidate may move and still count as "as close to fp32": 5 %.
#: Which near-tie voxels flip is rounding noise; on an NVIDIA H100 the eager rewrites moved 99.8541 % -> 12,250
#: voxels of 8.4 M against autocast's 12,115 (1.1 % more), and were refused by a strict comparison although the
#: compiled path with the same rewrites moved fewer than autocast (benchmarks/results/h100_startup_profile*.json)
FALLBACK_SLACK = 0.05
CHECK_PATCHES = 4


@dataclasses.dataclass
class Choice:
    """What ``choose`` picked: the spec the engines are built with, and why.

    spec: the resolved EngineSpec (fast off, its parts explicit); chosen: the parts turned on; skipped: part ->
    why it is off; check: the fp32 check's result ({"agreement", "patches", "verdict", "from": "checked" or
    "cache"}); kind: the engine kind picked (CPU rule); engine: the first fold's engine when the check built it"""

    spec: EngineSpec
    chosen: list[str] = dataclasses.field(default_factory=list)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    check: dict | None = None
    kind: str | None = None
    engine: object | None = None  # fold 0's engine, built for the check (reused, not built again)

    def to_json(self) -> dict:
        return {"engine": self.spec.text(), "chosen": self.chosen, "skipped": self.skipped, "check": self.check}


def check_patches(model, n: int = CHECK_PATCHES, seed: int = 0) -> torch.Tensor:
    """``n`` smooth random patches (n, c, z, y, x) float32 on the CPU, zero mean and unit variance per channel."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    shape = (n, model.num_input_channels, *model.patch_size)
    sigma = (0, 0, *[max(s / 16, 1.0) for s in model.patch_size])
    x = gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    x = (x - x.mean(axis=tuple(range(2, x.ndim)), keepdims=True)) / \
        (x.std(axis=tuple(range(2, x.ndim)), keepdims=True) + 1e-6)
    return torch.from_numpy(x.astype(np.float32))


def masks(engine, patches: torch.Tensor, batch: int) -> torch.Tensor:
    """The argmax masks (n, z, y, x) int64 of ``patches`` through ``engine``, batch by batch, on the CPU."""
    out = []
    for i in range(0, patches.shape[0], batch):
        logits = engine.infer(patches[i:i + batch].to(engine.device))
        out.append(logits.argmax(1).cpu())
    return torch.cat(out)


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a == b).double().mean())


def verdicts_entry(cache_url: str, fields: dict):
    """The engine cache's fast-path entry for ``fields`` (a compile_cache.JsonEntry): ``get`` its checked verdict,
    ``put`` a new one."""
    from trtseg.accel.compile_cache import JsonEntry

    return JsonEntry(cache_url, "fast_path", fields, "verdict", "fast path")


def _fields(model, spec: EngineSpec, device: torch.device, what: str) -> dict:
    from trtseg.accel.compile_cache import model_key_fields

    fields = model_key_fields(model, model.folds[0], spec, device)
    fields["what"] = what
    if what == "cuda":  # a verdict reached under another rule is checked again under this one
        fields["rule"] = f"min {MIN_AGREEMENT}, autocast slack {FALLBACK_SLACK}"
    if device.type == "cpu":
        fields["cpus"] = os.cpu_count()
    return fields


def choose(model, spec: EngineSpec, device: torch.device, kind: str, build: Builder, cache_url: str) -> Choice:
    """The spec to build ``model``'s engines with on ``device`` (``kind`` already resolved from spec.kind).

    build(spec, kind, fold) -> Engine: how the caller (trtseg.accel.engines.create_engines) builds one fold's
    engine; the engine built for the check is returned in ``Choice.engine``, so that it is not built twice."""
    if not spec.fast:
        return Choice(spec, kind=kind)
    if spec.precision in EIGHT_BIT and device.type != "cuda":  # quant8's float32 reference: the PyTorch engine as is
        return Choice(dataclasses.replace(spec, kind="torch", fast=False), kind="torch")
    if device.type == "cpu" and spec.kind == "auto":
        if getattr(model, "onnx_urls", None):  # a network given as ONNX (--onnx-model): ONNX Runtime runs it as given
            return Choice(dataclasses.replace(spec, kind="onnxruntime", fast=False), ["onnxruntime"],
                          {"torch": "the network is given as ONNX"}, None, "onnxruntime")
        return _choose_cpu(model, spec, device, build, cache_url)
    if device.type != "cuda" or kind != "torch" or getattr(model, "onnx_urls", None):
        return Choice(dataclasses.replace(spec, fast=False), kind=kind)
    return _choose_cuda(model, spec, device, build, cache_url)


def _applicable(model, spec: EngineSpec, device: torch.device) -> tuple[list[str], dict[str, str]]:
    """The fast parts that may apply, and why each other one is off (before building anything)."""
    import importlib.util

    skipped: dict[str, str] = {p: "turned off (--no-" + p + ")" for p in FAST_PARTS if p in spec.off}
    precision = spec.resolved_precision(device)
    has_triton = importlib.util.find_spec("triton") is not None
    for part in FAST_PARTS:
        if part in skipped:
            continue
        if part in ("compile", "fuse-norms") and not has_triton:
            skipped[part] = "Triton is not installed (torch.compile's and the fused kernels' GPU code needs it)"
        elif part in REWRITES and precision in EIGHT_BIT:
            skipped[part] = f"precision {precision}: the 8-bit convolutions replace the layers it rewrites"
        elif part in ("fp16-weights", "fuse-norms") and precision not in ("fp16", *EIGHT_BIT):
            skipped[part] = f"precision {precision}, not fp16"
        elif part not in ("compile", "fp16-weights") and len(model.patch_size) != 3:
            skipped[part] = "a 2d network: the layouts and rewrites are for 3-D convolutions"
        elif part == "fuse-norms" and ("channels-last" in skipped or "fp16-weights" in skipped):
            skipped[part] = "it needs channels-last and fp16-weights"
        elif part == "fold-convolutions" and "channels-last" in skipped:
            skipped[part] = "it pays only with channels-last"
        elif part == "compile" and spec.cuda_graphs:
            skipped[part] = "--cuda-graphs asked for: the compiled graphs and captured CUDA graphs are not combined"
    return [p for p in FAST_PARTS if p not in skipped], skipped


def _with_parts(spec: EngineSpec, parts: list[str]) -> EngineSpec:
    return dataclasses.replace(
        spec, fast=False, compile=spec.compile or ("default" if "compile" in parts else None),
        channels_last=spec.channels_last or "channels-last" in parts,
        fp16_weights=spec.fp16_weights or "fp16-weights" in parts,
        rewrites=spec.rewrites | {p for p in parts if p in REWRITES})


def _choose_cuda(model, spec: EngineSpec, device: torch.device, build: Builder, cache_url: str) -> Choice:
    parts, skipped = _applicable(model, spec, device)
    plain = dataclasses.replace(spec, fast=False)
    if not parts:
        _log_skipped(model, skipped)
        return Choice(plain, skipped=skipped, kind="torch")
    if spec.precision in EIGHT_BIT:
        # compile and the layouts keep the 8-bit engine's function; its accuracy against fp32 is the 8-bit gate's
        # (trtseg.accel.eight_bit, on whole calibration cases), not this check's, whose fallback is fp16 autocast
        _log_skipped(model, skipped)
        return Choice(_with_parts(spec, parts), parts, skipped,
                      {"verdict": "not checked here: the 8-bit accuracy gate decides"}, "torch")
    verdicts = verdicts_entry(cache_url, _fields(model, spec, device, "cuda"))
    cached = verdicts.get()
    if verdicts.note:
        log.warning("fast path: %s", verdicts.note)
    engine = None
    if cached is not None:
        chosen, check = cached["chosen"], {**cached["check"], "from": "cache"}
        skipped.update(cached["skipped"])
    else:
        fold = model.folds[0]
        # built now, compiled at its first call: which rewrites found something to rewrite in this network
        engine = build(_with_parts(spec, parts), "torch", fold)
        done = engine.describe()
        counts = {"fold-convolutions": done.get("folded_convolutions"), "merge-upsampling":
                  done.get("merged_upsamplings"), "fuse-norms": done.get("fused_norms")}
        empty = [r for r, n in counts.items() if r in parts and n == 0]
        if empty:
            skipped.update({r: "nothing in this network to rewrite" for r in empty})
            parts = [p for p in parts if p not in empty]
            engine = build(_with_parts(spec, parts), "torch", fold)
        chosen = parts
        check = _check(engine, build(EngineSpec("torch", precision="fp32", fast=False), "torch", fold),
                       build(plain, "torch", fold), model, spec.batch_size)
        if check["verdict"] != "passed":
            why = (f"failed the fp32 check ({check['agreement']:.4%} of voxels, below {MIN_AGREEMENT:.1%} and further "
                   f"from fp32 than fp16 autocast's {check['fallback_agreement']:.4%})")
            skipped.update({p: why for p in chosen})
            chosen, engine = [], None
        verdicts.put({"chosen": chosen, "skipped": {k: v for k, v in skipped.items() if not v.startswith(
                      "turned off")}, "check": check})
        check = {**check, "from": "checked"}
    _log_skipped(model, skipped)
    if chosen:
        log.info("fast path for %s: %s (masks %.4f%% of fp32's on %d check patches, fp16 autocast's %.4f%%; %s)",
                 model.folder, "+".join(chosen), 100 * check["agreement"], check["patches"],
                 100 * check.get("fallback_agreement", float("nan")), check["from"])
    else:
        log.warning("fast path for %s: none of its parts runs; fp16 autocast without rewrites", model.folder)
    return Choice(_with_parts(spec, chosen), chosen, skipped, check, "torch", engine)


def packages_ready(model, spec: EngineSpec, device: torch.device, cache_url: str) -> bool:
    """Whether the engines that ``choose`` would build for ``spec`` run compiled code from packages already in the
    engine cache at ``cache_url`` (its cached verdict chose compile, and every fold's package is there): then
    compiled code costs a process no compile and no tracing (trtseg/accel/aoti_package.py), and even a run of one
    case takes it."""
    from trtseg.accel.aoti_package import AotiPackageEntry
    from trtseg.accel.compile_cache import model_key_fields

    if not (spec.fast and spec.package) or device.type != "cuda" or not torch.cuda.is_available():
        return False
    cached = verdicts_entry(cache_url, _fields(model, spec, device, "cuda")).get()
    if not cached or "compile" not in cached.get("chosen", []):
        return False
    chosen = _with_parts(spec, cached["chosen"])
    return all(AotiPackageEntry(cache_url, model_key_fields(model, fold, chosen, device)).exists()
               for fold in model.folds)


def _check(candidate, reference, fallback, model, batch_size: int) -> dict:
    """The candidate engine's masks against the plain fp32 network's (``reference``) on the check patches, beside
    those of ``fallback``: fp16 autocast without rewrites, what runs when the candidate is refused.

    The candidate passes when its masks agree with fp32's on >= MIN_AGREEMENT of the check voxels, or on at least
    as many as the fallback's do. The second clause is there because fp16 autocast, nnU-Net's own precision on
    CUDA, itself moves more than 0.1 % of voxels on some networks: on the benchmark's seeded random 3d_fullres
    network it agreed with fp32 on 99.854 % of check voxels and 99.892 % of real CT patches' voxels, the full fast
    path on 99.864 % and 99.899 % (benchmarks/results/h200_fast_path_parts.json). Refusing a candidate that is at
    least as close to fp32 as the fallback would only trade speed for nothing."""
    patches = check_patches(model)
    batch = max(batch_size, 1)
    ref = masks(reference, patches, batch)
    del reference
    plain = agreement(ref, masks(fallback, patches, batch))
    del fallback
    t = time.perf_counter()
    got = masks(candidate, patches, batch)  # a compiled candidate compiles here (or builds its package): the run's own
    seconds = time.perf_counter() - t
    if candidate.device.type == "cuda":
        torch.cuda.empty_cache()
    agree = agreement(ref, got)
    verdict, rule = judge(agree, plain)
    return {"agreement": round(agree, 6), "fallback_agreement": round(plain, 6), "patches": int(patches.shape[0]),
            "seconds": round(seconds, 2), "verdict": verdict, "rule": rule}


def judge(agree: float, fallback: float) -> tuple[str, str]:
    """The check's verdict and the rule that gave it, from the candidate's and the fallback's voxel agreement with
    fp32 on the check patches (fractions)."""
    if agree >= MIN_AGREEMENT:
        return "passed", f">= {MIN_AGREEMENT:.1%} of fp32's"
    if 1.0 - agree <= (1.0 - fallback) * (1.0 + FALLBACK_SLACK):
        return "passed", f"as close to fp32 as fp16 autocast (within {FALLBACK_SLACK:.0%} of its moved voxels)"
    return "failed", f"below {MIN_AGREEMENT:.1%} of fp32's and further from it than fp16 autocast"


def _choose_cpu(model, spec: EngineSpec, device: torch.device, build: Builder, cache_url: str) -> Choice:
    """ONNX Runtime or PyTorch fp32 on the CPU: the faster of the two that agree on the check patches."""
    verdicts = verdicts_entry(cache_url, _fields(model, spec, device, "cpu"))
    cached = verdicts.get()
    engine = None
    if cached is not None:
        kind, check = cached["kind"], {**cached["check"], "from": "cache"}
    else:
        kind, check, engine = _measure_cpu(model, spec, build)
        verdicts.put({"kind": kind, "check": check})
        check = {**check, "from": "checked"}
    log.info("engine on the CPU for %s: %s (%s)", model.folder, kind, check.get("why"))
    return Choice(dataclasses.replace(spec, kind=kind, fast=False), [kind], {}, check, kind, engine)


def _measure_cpu(model, spec: EngineSpec, build: Builder) -> tuple[str, dict, object]:
    patches = check_patches(model, 2)
    batch = max(spec.batch_size, 1)
    timing, out, engines = {}, {}, {}
    for kind in ("torch", "onnxruntime"):
        try:
            engine = build(dataclasses.replace(spec, kind=kind, fast=False), kind, model.folds[0])
        except Exception as e:  # ONNX export or ONNX Runtime unusable for this network: PyTorch runs
            if kind == "torch":
                raise
            why = f"ONNX Runtime not usable ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})"
            log.warning("engine on the CPU for %s: %s; PyTorch runs", model.folder, why)
            return "torch", {"why": why}, engines["torch"]
        masks(engine, patches[:1], 1)  # first call: allocation, graph optimization
        t = time.perf_counter()
        out[kind] = masks(engine, patches, batch)
        timing[kind] = round(time.perf_counter() - t, 4)
        engines[kind] = engine
    agree = agreement(out["torch"], out["onnxruntime"])
    if agree < MIN_AGREEMENT:
        return "torch", {"agreement": agree, "seconds": timing, "why": f"ONNX Runtime's masks agree with "
                         f"PyTorch's on {agree:.4%} of check voxels only"}, engines["torch"]
    kind = min(timing, key=lambda k: timing[k])
    return kind, {"agreement": round(agree, 6), "seconds": timing,
                  "why": f"faster on {patches.shape[0]} check patches ({timing['torch']} s PyTorch, "
                         f"{timing['onnxruntime']} s ONNX Runtime)"}, engines[kind]


def _log_skipped(model, skipped: dict[str, str]) -> None:
    for part, why in skipped.items():
        if not why.startswith("turned off"):
            log.info("fast path for %s: --%s off: %s", model.folder, part, why)
