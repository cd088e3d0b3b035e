"""What a run does, declared once as typed data: the window, the engine spec and the output.

Each option is a dataclass field whose metadata holds its command-line flag and help. ``add_options`` puts them on
any argparse parser (`trtseg predict`, `trtseg compare`, the benchmarks) and ``from_args`` reads them back, so a
flag exists in exactly one place. ``EngineSpec.parse`` is the one text syntax for an engine
(``KIND[:TOKEN+TOKEN...]``, e.g. ``torch:fp16+compile+channels-last``), shared by `trtseg compare` and the
benchmarks. Everything here is plain data: it crosses process boundaries to Ray workers.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

ENGINE_KINDS = ("auto", "tensorrt", "torch", "onnxruntime", "pycuda")
# fp8 and int8: the PyTorch engine's calibrated 8-bit convolutions (trtseg/accel/eight_bit.py), gated against fp32
EIGHT_BIT = ("fp8", "int8")
PRECISIONS = ("fp32", "fp16", "bf16", *EIGHT_BIT)
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
# EngineSpec's calibration fields: `trtseg export` and `trtseg compare` take these flags without the rest of the spec
CALIBRATION_OPTIONS = ("calibration", "calibration_cases", "calibration_method", "max_dice_drop")
COMPILE_MODES = ("default", "max-autotune")
# the PyTorch engine's network rewrites: same function, less GPU time (see trtseg/accel/rewrites/)
REWRITES = {
    "fold-convolutions": "compute the 32-channel 3x3x3 convolutions width-folded, the same function on wider "
                         "tensor-core tiles (PyTorch CUDA engine; pays with --channels-last)",
    "merge-upsampling": "merge each decoder stage's transposed convolution into the convolution after it, the same "
                        "function with fewer multiply-adds (PyTorch engine)",
    "fuse-norms": "fuse InstanceNorm + LeakyReLU into the full-resolution 32-channel convolutions, the first block "
                  "and the head with Triton kernels, the same function with fewer passes over the largest tensors "
                  "(PyTorch CUDA engine; needs --fp16-weights and --channels-last)",
}
# what the fast path (trtseg/accel/fast_path.py) may turn on by itself on CUDA; each has a --no-X flag that keeps it off
FAST_PARTS = ("compile", "channels-last", "fp16-weights", *REWRITES)
# short spellings of EngineSpec.parse's tokens, kept so that recorded benchmark commands still run
_ALIASES = {"cl": "channels-last", "half": "fp16-weights", "graphs": "cuda-graphs", "max": "max-autotune",
            "fold": "fold-convolutions", "merge": "merge-upsampling", "fuse": "fuse-norms"}


def opt(default: Any, flag: str, help: str, aliases: tuple[str, ...] = (), **argparse_kwargs) -> Any:
    """A dataclass field declared with its command-line flag and any aliases (nnU-Net's spellings), and argparse's
    keyword arguments (choices, type, action, nargs...)."""
    meta = {"flag": flag, "help": help, "aliases": aliases, **argparse_kwargs}
    if isinstance(default, (set, frozenset, list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class WindowOptions:
    """The sliding window: tile step as a fraction of the patch (nnU-Net's 0.5), mirroring test-time augmentation
    over the checkpoint's allowed axes, and the folds whose engines each tile runs through (their mean is taken)."""

    step_size: float = opt(0.5, "--step-size", "tile step as a fraction of the patch size", aliases=("-step_size",),
                           type=float)
    use_mirroring: bool = opt(True, "--disable-tta", "no mirroring test-time augmentation", aliases=("--disable_tta",),
                              action="store_false")
    folds: list[str] | None = opt(None, "-f", "folds to ensemble (default: every fold found)", aliases=("--folds",),
                                  nargs="+")
    accumulate: str = opt("fp32", "--accumulate", "tile sums in float32, or in float16 with nnU-Net v2's own "
                          "rounding steps (fp16: masks equal to nnUNetv2_predict's, one actor per case)",
                          choices=["fp32", "fp16"])


@dataclass(frozen=True)
class EngineSpec:
    """What runs the network, and how.

    kind: auto (TensorRT if it imports and a GPU exists, then PyTorch CUDA, then ONNX Runtime on the CPU), tensorrt,
        torch, onnxruntime or pycuda
    device: "cpu", "cuda" or "cuda:N"; None picks cuda when available
    precision: fp32, fp16 or bf16; None: fp16 on CUDA (nnU-Net's autocast), fp32 on the CPU. fp8 or int8: the
        PyTorch engine with calibrated 8-bit convolutions (trtseg/accel/eight_bit.py), refused unless its masks on
        the calibration cases keep each label's Dice against fp32 within max_dice_drop
    batch_size: tiles per engine call (a TensorRT profile's and a compiled graph's batch)
    compile: torch.compile mode ("default" or "max-autotune"); None: eager
    rewrites: the network rewrites to apply (keys of REWRITES)
    fast: let trtseg.accel.fast_path choose the engine's options (CUDA: compile, layouts and the rewrites that apply,
        checked once against fp32; CPU: ONNX Runtime or PyTorch, measured); False: exactly what the other fields say
    off: parts of the fast path (FAST_PARTS) it must leave off (the --no-X flags)
    package: compiled code as an AOTInductor package kept in the engine cache (trtseg/accel/aoti_package.py),
        experimental; False: torch.compile in each process, its results from the compile cache
    compile_from: the passes over whole cases (cases x mirrorings) from which a run in one process lets the fast path
        compile and fuse the norms; fewer leave both off (trtseg.predict.small_run_settings)
    cache: URL of exported ONNX graphs and built engines (default $TRTSEG_CACHE or ~/.cache/trtseg)
    calibration: fp8/int8 (and `trtseg export`'s INT8): a folder or URL of real input volumes whose patches set the
        activation scales and whose first calibration_cases cases the accuracy gate predicts; `trtseg predict`
        takes its own input when none is given
    calibration_method: how activation ranges become scales (trtseg.accel.quant8.METHODS)
    max_dice_drop: the largest loss of any label's mean Dice against fp32 on the calibration cases that an 8-bit
        engine may show; None: no gate
    """

    kind: str = opt("auto", "--engine", "auto: TensorRT if it imports and a GPU exists, then PyTorch CUDA, then ONNX "
                    "Runtime (CPU)", choices=ENGINE_KINDS)
    device: str | None = opt(None, "--device", "cpu, cuda or cuda:N (default: cuda when available)",
                             aliases=("-device",))
    precision: str | None = opt(None, "--precision", "engine precision (CUDA default fp16); fp8 or int8: calibrated "
                                "8-bit convolutions on the PyTorch engine, gated against fp32 (see --calibration)",
                                choices=PRECISIONS)
    batch_size: int = opt(2, "--batch-size", "tiles per engine call", type=int)
    compile: str | None = opt(None, "--compile", "torch.compile the network (PyTorch CUDA engine); max-autotune also "
                              "times Triton kernels against cuDNN's, minutes of compile that Inductor's cache keeps",
                              nargs="?", const="default", choices=COMPILE_MODES)
    cuda_graphs: bool = opt(False, "--cuda-graphs", "capture and replay CUDA graphs (PyTorch/TensorRT on CUDA)",
                            action="store_true")
    channels_last: bool = opt(False, "--channels-last", "channels-last-3d weights and tiles (PyTorch CUDA engine)",
                              action="store_true")
    fp16_weights: bool = opt(False, "--fp16-weights", "with fp16: an fp16 network with fp32 normalization layers "
                             "instead of autocast (PyTorch CUDA engine)", action="store_true")
    rewrites: frozenset = opt(frozenset(), "", "network rewrites", rewrites=REWRITES)
    fast: bool = opt(True, "--no-fast", "no automatic engine choice: no compile, layouts or rewrites unless their "
                     "flags ask for them, and ONNX Runtime on the CPU (trtseg/accel/fast_path.py)",
                     action="store_false")
    off: frozenset = opt(frozenset(), "", "parts of the fast path to leave off", parts_off=FAST_PARTS)
    # off by default: on an NVIDIA H200 a process that built the package for nnU-Net's 3d_fullres network with the
    # fused norms died (SIGSEGV) after exporting it, in the first and in a second process
    # (benchmarks/results/h200_predict_aoti_package.json); torch.compile with its compile cache is the checked default
    package: bool = opt(False, "--compiled-package", "compiled code as an AOTInductor package built once per GPU type "
                        "and loaded without tracing (trtseg/accel/aoti_package.py; experimental: it crashed a GPU "
                        "run), instead of torch.compile in every process", action="store_true")
    compile_from: int = opt(8, "--compile-from", "a run in one process compiles (the fast path's torch.compile and "
                            "fused-norm kernels) from this many network passes over whole cases (cases, times 8 with "
                            "3-D mirroring); fewer run without them, which starts seconds sooner (0: always)",
                            type=int)
    cache: str | None = opt(None, "--engine-cache", "URL for exported ONNX and built engines (default "
                            "~/.cache/trtseg)")
    calibration: str | None = opt(None, "--calibration", "fp8/int8: folder or URL of real input volumes to calibrate "
                                  "on and to check against fp32 (default for predict: its input)")
    calibration_cases: int = opt(2, "--calibration-cases", "fp8/int8: cases of --calibration whose masks the "
                                 "accuracy gate compares with fp32's", type=int)
    calibration_method: str = opt("percentile", "--calibration-method", "fp8/int8: activation ranges from the "
                                  "largest value (minmax), the 99.99th percentile or TensorRT's entropy threshold",
                                  choices=CALIBRATION_METHODS)
    max_dice_drop: float | None = opt(0.005, "--max-dice-drop", "fp8/int8: refuse the engine when any label's Dice "
                                      "against fp32 on the calibration cases drops by more", type=float)

    def __post_init__(self):
        object.__setattr__(self, "rewrites", frozenset(self.rewrites))
        object.__setattr__(self, "off", frozenset(self.off))
        unknown = self.rewrites - set(REWRITES)
        if unknown:
            raise ValueError(f"unknown network rewrite(s) {sorted(unknown)}; known: {sorted(REWRITES)}")
        if self.off - set(FAST_PARTS):
            raise ValueError(f"unknown fast-path part(s) {sorted(self.off - set(FAST_PARTS))}; known: {FAST_PARTS}")

    def with_(self, **changes) -> "EngineSpec":
        return dataclasses.replace(self, **changes)

    def resolved_device(self):
        """The torch.device: ``device``, else cuda when available, else cpu."""
        import torch
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def resolved_precision(self, device=None) -> str:
        """``precision``, else fp16 on CUDA (nnU-Net's autocast) and fp32 on the CPU (of ``device``, default
        ``resolved_device()``)."""
        device = device if device is not None else self.resolved_device()
        return self.precision or ("fp16" if device.type == "cuda" else "fp32")

    @classmethod
    def parse(cls, text: str, base: "EngineSpec | None" = None) -> "EngineSpec":
        """``KIND[:TOKEN+TOKEN...]`` or ``TOKEN+TOKEN...`` (kind torch) -> an EngineSpec over ``base``.

        Tokens: a precision (fp32, fp16, bf16), compile or max-autotune, and the flag names of the boolean
        options and rewrites without their dashes in front (cuda-graphs, channels-last, fp16-weights,
        fold-convolutions, ...), or their short spellings (graphs, cl, half, fold, merge, fuse, max); no-fast, and
        no-PART for a part of the fast path to leave off (no-compile, no-fuse-norms, ...)."""
        base = base or cls()
        kind, sep, rest = text.partition(":")
        if not sep:
            kind, rest = ("torch", text) if text not in ENGINE_KINDS else (text, "")
        if kind not in ENGINE_KINDS:
            raise ValueError(f"{text!r}: engine kind must be one of {ENGINE_KINDS}")
        changes: dict[str, Any] = {"kind": kind}
        rewrites, off = set(base.rewrites), set(base.off)
        flags = {f.metadata["flag"].lstrip("-"): f.name for f in dataclasses.fields(cls)
                 if f.metadata.get("action") == "store_true"}
        for token in filter(None, rest.split("+")):
            token = _ALIASES.get(token, token)
            if token in PRECISIONS:
                changes["precision"] = token
            elif token == "compile" or token in COMPILE_MODES:
                changes["compile"] = "default" if token == "compile" else token
            elif token in flags:
                changes[flags[token]] = True
            elif token in REWRITES:
                rewrites.add(token)
            elif token == "no-fast":
                changes["fast"] = False
            elif token.startswith("no-") and _ALIASES.get(token[3:], token[3:]) in FAST_PARTS:
                off.add(_ALIASES.get(token[3:], token[3:]))
            else:
                raise ValueError(f"{text!r}: unknown engine option {token!r}")
        return dataclasses.replace(base, rewrites=frozenset(rewrites), off=frozenset(off), **changes)

    def text(self) -> str:
        """The spec in ``parse``'s syntax (options that differ from the defaults)."""
        tokens = [self.precision] if self.precision else []
        if self.compile:
            tokens.append("compile" if self.compile == "default" else self.compile)
        tokens += [f.metadata["flag"].lstrip("-") for f in dataclasses.fields(self)
                   if f.metadata.get("action") == "store_true" and getattr(self, f.name)]
        tokens += sorted(self.rewrites)
        tokens += ([] if self.fast else ["no-fast"]) + [f"no-{p}" for p in FAST_PARTS if p in self.off]
        return self.kind + (":" + "+".join(tokens) if tokens else "")


@dataclass(frozen=True)
class OutputOptions:
    """What is written per case besides the mask, and how."""

    save_probabilities: bool = opt(False, "--save-probabilities", "also write CASE.npz/CASE.pkl as nnU-Net does",
                                   aliases=("--save_probabilities",), action="store_true")
    # level 1 (igzip): on a 512x512x240 CT mask 0.04 s and 4.0 MB against zlib 6's 1.23 s and 3.0 MB, on 2 CPU
    # cores (benchmarks/results/cpu2core_mask_gzip.json); every level gives the same voxels
    compress_level: int = opt(1, "--compress-level", "gzip level of written masks (1 fastest, the default; 9 "
                              "smallest)", type=int)
    postprocessing: str | None = opt(None, "--postprocessing", "nnU-Net's postprocessing file to apply to every mask: "
                                     "v2's postprocessing.pkl (nnUNetv2_find_best_configuration) or v1's "
                                     "postprocessing.json (a v1 model folder's own applies by default)")
    disable_postprocessing: bool = opt(False, "--disable-postprocessing", "no postprocessing, not even a v1 model "
                                       "folder's postprocessing.json (nnU-Net v1's flag)", action="store_true")
    output_format: str = opt("nifti", "--output-format", "for DICOM series: the mask as NIfTI (CASE.nii.gz), as a "
                             "DICOM Segmentation (CASE.seg.dcm) referencing the series, or both",
                             choices=["nifti", "dicom-seg", "both"])


@dataclass(frozen=True)
class InputOptions:
    """Which series of a DICOM study folder is the case's image (trtseg/dicom.py). A case folder that holds several
    series is refused unless these pick exactly one; each given rule must match."""

    series_modality: str | None = opt(None, "--series-modality", "DICOM study folders: take the series of this "
                                      "Modality (CT, MR, ...)")
    series_description: str | None = opt(None, "--series-description", "DICOM study folders: take the series whose "
                                         "SeriesDescription matches this regular expression (case-insensitive)")
    series_uid: str | None = opt(None, "--series-uid", "DICOM study folders: take the series with this "
                                 "SeriesInstanceUID")

    def given(self) -> dict[str, str]:
        """The rules given, by field name: empty when none is."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v}


def add_options(parser: argparse.ArgumentParser | Any, cls: type, only: tuple[str, ...] | None = None,
                defaults: Any = None) -> None:
    """Adds the flags of dataclass ``cls``'s fields to ``parser`` (every field, or those named in ``only``).

    defaults: an instance whose values become the flags' defaults (a benchmark's own)."""
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        meta = dict(f.metadata)
        flag, help_, aliases = meta.pop("flag"), meta.pop("help"), meta.pop("aliases", ())
        default = getattr(defaults, f.name) if defaults is not None else \
            (f.default if f.default is not dataclasses.MISSING else f.default_factory())  # type: ignore[misc]
        if "rewrites" in meta:
            for name, text in meta.pop("rewrites").items():
                parser.add_argument(f"--{name}", action="store_true", default=name in default, help=text)
            continue
        if "parts_off" in meta:
            for name in meta.pop("parts_off"):
                parser.add_argument(f"--no-{name}", action="store_true", default=name in default,
                                    help=f"the fast path leaves --{name} off")
            continue
        parser.add_argument(flag, *aliases, dest=f.name, default=default, help=help_, **meta)


def from_args(cls: type, args: argparse.Namespace):
    """The ``cls`` instance that ``add_options``' flags parsed into ``args``."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name == "folds" and getattr(args, "folds", None) is not None:
            values["folds"] = tuple(str(v) for v in args.folds)
        elif "rewrites" in f.metadata:
            values[f.name] = frozenset(n for n in f.metadata["rewrites"] if getattr(args, n.replace("-", "_"), False))
        elif "parts_off" in f.metadata:
            values[f.name] = frozenset(n for n in f.metadata["parts_off"]
                                       if getattr(args, "no_" + n.replace("-", "_"), False))
        elif hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    return cls(**values)


def option_flags(cls: type) -> set[str]:
    """Every flag ``add_options`` gives ``cls``: what a test compares across parsers."""
    flags = set()
    for f in dataclasses.fields(cls):
        if "rewrites" in f.metadata:
            flags |= {f"--{n}" for n in f.metadata["rewrites"]}
        elif "parts_off" in f.metadata:
            flags |= {f"--no-{n}" for n in f.metadata["parts_off"]}
        else:
            flags.add(f.metadata["flag"])
    return flags


@dataclass
class Settings:
    """Everything that decides how a case is predicted: what `trtseg predict` and the Ray job's workers share.

    memory_budget_gb: a case whose volume and logits would need more device memory fails, clearly, before
        inference (see trtseg.pipeline.case_bytes); None: no limit
    """

    window: WindowOptions = field(default_factory=WindowOptions)
    engine: EngineSpec = field(default_factory=EngineSpec)
    output: OutputOptions = field(default_factory=OutputOptions)
    input: InputOptions = field(default_factory=InputOptions)
    memory_budget_gb: float | None = opt(None, "--memory-budget-gb", "fail a case (clearly, before inference) whose "
                                         "volume and logits need more device memory", type=float)
    prev_stage_predictions: str | None = opt(
        None, "--prev-stage-predictions", "a cascade (3d_cascade_fullres) model's previous-stage masks: a folder of "
        "CASE masks made by its 3d_lowres model (by trtseg or nnUNetv2_predict)", aliases=("-prev_stage_predictions",))

    def for_input(self, input_url: str) -> "Settings":
        """These settings for a run over ``input_url``: an fp8/int8 engine without --calibration calibrates on the
        run's own input (its real volumes, the scans the engine will segment)."""
        spec = self.engine
        if spec.precision in EIGHT_BIT and not spec.calibration:
            return dataclasses.replace(self, engine=spec.with_(calibration=input_url))
        return self

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["engine"]["rewrites"] = sorted(self.engine.rewrites)
        d["engine"]["off"] = sorted(self.engine.off)
        return d


def add_settings(parser: argparse.ArgumentParser | Any) -> None:
    """Every Settings flag: the window's, the engine's, the output's, the input's and the memory budget."""
    for cls in (WindowOptions, EngineSpec, OutputOptions, InputOptions):
        add_options(parser, cls)
    add_options(parser, Settings, only=("memory_budget_gb", "prev_stage_predictions"))


def settings_from_args(args: argparse.Namespace) -> Settings:
    return Settings(window=from_args(WindowOptions, args), engine=from_args(EngineSpec, args),
                    output=from_args(OutputOptions, args), input=from_args(InputOptions, args),
                    memory_budget_gb=args.memory_budget_gb,
                    prev_stage_predictions=args.prev_stage_predictions)
