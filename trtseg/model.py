"""nnU-Net v2 trained model folders: dataset.json, plans.json, fold_N/checkpoint_final.pth.

``load_v2_model_folder`` reads the folder (any fsspec URL), resolves the configuration the checkpoints were trained
with (following ``inherits_from``), and keeps each fold's weights. ``NnUNetModel.build_network`` builds the network
with dynamic-network-architectures exactly as nnU-Net's trainer does, deep supervision off.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import io
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from trtseg import storage
from trtseg.errors import ModelFolderError
from trtseg.postprocess import NONE, Postprocessing

log = logging.getLogger(__name__)

CHECKPOINT_KEYS = ("network_weights", "trainer_name", "init_args")


@dataclass(frozen=True)
class LabelScheme:
    """What the network's output channels mean (nnU-Net's LabelManager).

    labels: dataset.json's "labels" (name -> int, or name -> list of ints for regions)
    regions: for region-based models, the label tuple each output channel stands for; None otherwise
    regions_class_order: the label written for each region, in painting order
    num_heads: number of network output channels
    """

    labels: dict[str, Any]
    regions: tuple[tuple[int, ...], ...] | None
    regions_class_order: tuple[int, ...] | None
    num_heads: int
    foreground_labels: tuple[int, ...]

    @property
    def has_regions(self) -> bool:
        return self.regions is not None

    @property
    def mask_dtype(self) -> str:
        """uint8 below 255 foreground labels, else uint16, as nnU-Net writes them."""
        return "uint8" if len(self.foreground_labels) < 255 else "uint16"

    @classmethod
    def from_dataset_json(cls, dataset_json: dict, where: str) -> "LabelScheme":
        labels = dataset_json.get("labels")
        if not isinstance(labels, dict) or "background" not in labels:
            raise ModelFolderError(where, 'dataset.json "labels" must map names to labels and declare "background": 0')
        has_regions = any(isinstance(v, (list, tuple)) and len(v) > 1 for v in labels.values())
        all_labels: set[int] = set()
        for k, v in labels.items():
            if k == "ignore":
                continue
            all_labels.update(int(x) for x in (v if isinstance(v, (list, tuple)) else [v]))
        fg = tuple(sorted(x for x in all_labels if x != 0))
        if not has_regions:
            return cls(dict(labels), None, None, len(all_labels), fg)
        rco = dataset_json.get("regions_class_order")
        regions = []
        for k, v in labels.items():
            vals = tuple(int(x) for x in (v if isinstance(v, (list, tuple)) else [v]))
            if k == "ignore" or set(vals) == {0}:
                continue
            regions.append(vals)
        if rco is None or len(rco) != len(regions):
            raise ModelFolderError(where, f"region-based labels need regions_class_order with {len(regions)} entries, got {rco}")
        return cls(dict(labels), tuple(regions), tuple(int(x) for x in rco), len(regions), fg)


@dataclass(frozen=True)
class ResamplingSpec:
    """One of the plans' resampling functions with its arguments.

    kind: "default" (nnU-Net's scipy/skimage numerics: B-spline order 3 for data, order 1 for logits),
          "torch" (resample_torch_fornnunet: linear, nearest-exact along a separate z), or "none"
    order: in-plane (or full 3-D) interpolation order; order_z: along the low-resolution axis when separate
    force_separate_z: None = decide from the spacings, as nnU-Net does
    """

    kind: str
    order: int
    order_z: int
    force_separate_z: bool | None
    anisotropy_threshold: float = 3.0

    @classmethod
    def from_plans(cls, name: str, kwargs: dict, where: str) -> "ResamplingSpec":
        kw = dict(kwargs or {})
        thr = float(kw.get("separate_z_anisotropy_threshold", 3.0))
        if name in ("resample_data_or_seg_to_shape", "resample_data_or_seg_to_spacing", "resample_data_or_seg"):
            return cls("default", int(kw.get("order", 3)), int(kw.get("order_z", 0)), kw.get("force_separate_z", False), thr)
        if name == "resample_torch_fornnunet":
            if kw.get("mode", "linear") != "linear" or kw.get("aniso_axis_mode", "nearest-exact") != "nearest-exact":
                raise ModelFolderError(where, f"resample_torch_fornnunet with {kw} is not supported (mode='linear' only)")
            return cls("torch", 1, 0, kw.get("force_separate_z", None), thr)
        if name == "resample_torch_simple":
            return cls("torch", 1, 0, False, thr)
        if name == "no_resampling_hack":
            return cls("none", 0, 0, False, thr)
        raise ModelFolderError(where, f"unsupported resampling function {name!r} in plans")


@dataclass
class NnUNetModel:
    """A trained nnU-Net v2 model: resolved configuration, labels, and one state dict per fold.

    patch_size: (z, y, x) in the model's axis order (after transpose_forward)
    spacing: target spacing (z, y, x) in the model's axis order
    """

    folder: str
    plans: dict
    dataset_json: dict
    configuration_name: str
    configuration: dict
    labels: LabelScheme
    trainer_name: str
    mirror_axes: tuple[int, ...] | None
    fold_weights: dict[str, dict[str, torch.Tensor]]
    checkpoint_name: str
    fingerprint: str = ""
    _arch: dict = field(default_factory=dict, repr=False)
    #: models described by a card (trtseg/accel/card.py) build their network with this instead of the plans
    network_factory: Callable[[str], torch.nn.Module] | None = field(default=None, repr=False)
    #: models given as ONNX (card + .onnx): the graph each fold runs, for ONNX Runtime and TensorRT engines
    onnx_urls: dict[str, str] = field(default_factory=dict)
    #: 1 for nnU-Net v1 folders (trtseg/model_v1.py): v1's preprocessing order, probability aggregation and export
    nnunet_version: int = 2
    #: the connected-component postprocessing of its masks (trtseg/postprocess.py): a v1 folder's
    #: postprocessing.json by default, or the file given with --postprocessing
    postprocessing: Postprocessing = field(default=NONE)
    #: what loading found and kept, for the run report (a card's norm layers, say)
    notes: tuple[str, ...] = ()

    def with_folds(self, folds: list[str]) -> "NnUNetModel":
        """The same model restricted to ``folds``."""
        return dataclasses.replace(self, fold_weights={f: self.fold_weights[f] for f in folds},
                                   onnx_urls={f: u for f, u in self.onnx_urls.items() if f in folds})

    def without_weights(self) -> "NnUNetModel":
        """Plans, labels and configuration only: what preprocessing and export need, light to ship to workers."""
        return dataclasses.replace(self, fold_weights={f: {} for f in self.fold_weights}, network_factory=None)

    @property
    def folds(self) -> list[str]:
        return list(self.fold_weights)

    @property
    def patch_size(self) -> tuple[int, ...]:
        return tuple(int(p) for p in self.configuration["patch_size"])

    @property
    def spacing(self) -> tuple[float, ...]:
        """The configuration's target spacing, model axis order: (z, y, x), or (y, x) for a 2d configuration."""
        return tuple(float(s) for s in self.configuration["spacing"])

    def target_spacing(self, spacing_transposed) -> tuple[float, float, float]:
        """The (z, y, x) spacing a case is resampled to: the configuration's, and for a 2d configuration the case's
        own slice spacing first (nnU-Net's preprocessor and export leave the spacing between slices alone)."""
        if len(self.spacing) == 2:
            return (float(spacing_transposed[0]), *self.spacing)  # type: ignore[return-value]
        return self.spacing  # type: ignore[return-value]

    @property
    def transpose_forward(self) -> tuple[int, ...]:
        return tuple(int(i) for i in self.plans.get("transpose_forward", (0, 1, 2)))

    @property
    def transpose_backward(self) -> tuple[int, ...]:
        return tuple(int(i) for i in self.plans.get("transpose_backward", (0, 1, 2)))

    @property
    def num_image_channels(self) -> int:
        """Image files per case (dataset.json's channel_names)."""
        names = self.dataset_json.get("channel_names", self.dataset_json.get("modality", {}))
        return len(names)

    @property
    def num_input_channels(self) -> int:
        """The network's input channels: the images, and for a cascade one channel per foreground label of the
        previous stage's mask (nnU-Net's determine_num_input_channels)."""
        extra = len(self.labels.foreground_labels) if self.previous_stage else 0
        return self.num_image_channels + extra

    @property
    def normalization_schemes(self) -> list[str]:
        return list(self.configuration["normalization_schemes"])

    @property
    def use_mask_for_norm(self) -> list[bool]:
        return [bool(x) for x in self.configuration["use_mask_for_norm"]]

    @property
    def intensity_properties(self) -> dict[str, dict[str, float]]:
        return self.plans.get("foreground_intensity_properties_per_channel", {})

    @property
    def resampling_data(self) -> ResamplingSpec:
        c = self.configuration
        return ResamplingSpec.from_plans(c["resampling_fn_data"], c.get("resampling_fn_data_kwargs", {}), self.folder)

    @property
    def resampling_seg(self) -> ResamplingSpec:
        """The plans' segmentation resampling (a cascade's previous-stage mask goes through it)."""
        c = self.configuration
        return ResamplingSpec.from_plans(c.get("resampling_fn_seg", "resample_data_or_seg_to_shape"),
                                         c.get("resampling_fn_seg_kwargs", {"order": 1, "order_z": 0}), self.folder)

    @property
    def resample_first(self) -> bool:
        """Resample, then normalize (nnU-Net v1's order, or a card's preprocessing_order); else normalize first."""
        return self.nnunet_version == 1 or bool(self.configuration.get("trtseg_resample_first"))

    @property
    def crop_to_nonzero(self) -> bool:
        """Crop to the nonzero box before normalizing (nnU-Net's); a card may normalize over the whole volume."""
        return bool(self.configuration.get("trtseg_crop_to_nonzero", True))

    @property
    def aggregates_probabilities(self) -> bool:
        """Average softmax probabilities over mirrorings, tiles and folds (nnU-Net v1, or a card's aggregate:
        probabilities) instead of logits."""
        return self.nnunet_version == 1 or self.configuration.get("trtseg_aggregate") == "probabilities"

    @property
    def pad_side(self) -> str:
        """Where a volume smaller than the patch is padded: "centered" (nnU-Net's) or "end" (a card's choice)."""
        return str(self.configuration.get("trtseg_pad_side", "centered"))

    @property
    def previous_stage(self) -> str | None:
        """A cascade configuration's previous stage (3d_cascade_fullres: "3d_lowres"), else None."""
        return self.configuration.get("previous_stage")

    @property
    def resampling_probabilities(self) -> ResamplingSpec:
        c = self.configuration
        return ResamplingSpec.from_plans(c["resampling_fn_probabilities"],
                                         c.get("resampling_fn_probabilities_kwargs", {}), self.folder)

    def build_network(self, fold: str | None = None) -> torch.nn.Module:
        """The network of ``fold`` (default: the first) with its weights, in eval mode, deep supervision off."""
        fold = fold if fold is not None else self.folds[0]
        if self.network_factory is not None:
            return self.network_factory(fold).eval()
        if not self._arch:
            raise ModelFolderError(self.folder, "this model is an ONNX graph: run it with --engine onnxruntime or tensorrt")
        arch = self._arch
        if "generic_unet_v1" in arch:
            from trtseg.generic_unet import GenericUNet
            net = GenericUNet(**arch["generic_unet_v1"])
            load_weights(net, self.fold_weights[fold], self.folder, "the Generic_UNet its v1 plans describe")
            return net.eval()
        cls = _locate(arch["network_class_name"], self.folder)
        kwargs = copy.deepcopy(arch["arch_kwargs"])
        for key in arch.get("_kw_requires_import", []):
            if kwargs.get(key) is not None:
                kwargs[key] = _locate(kwargs[key], self.folder)
        kwargs["deep_supervision"] = False
        net = cls(input_channels=self.num_input_channels, num_classes=self.labels.num_heads, **kwargs)
        load_weights(net, self.fold_weights[fold], self.folder, "the network the plans describe")
        return net.eval()


def load_weights(net: torch.nn.Module, state: dict, where: str, what: str) -> None:
    """Loads a state dict, or one error that says in full sentences which keys are missing, unexpected or of
    another shape (a few of each named), instead of PyTorch's multi-line message."""
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the network" for k in own
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    for name, items in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)):
        if items:
            shown = "; ".join(items[:3]) + (f"; and {len(items) - 3} more" if len(items) > 3 else "")
            problems.append(f"{len(items)} {name} ({shown})")
    if problems:
        raise ModelFolderError(where, f"the weights do not fit {what}: {', '.join(problems)}")
    net.load_state_dict(state)


def _locate(dotted: str, where: str) -> Any:
    module, _, name = str(dotted).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ModelFolderError(where, f"plans name {dotted!r}, which cannot be imported ({e})") from None


def _read_json(url: str, where: str) -> dict:
    try:
        return json.loads(storage.read_bytes(url))
    except FileNotFoundError:
        raise ModelFolderError(where, f"missing {url.rsplit('/', 1)[-1]}") from None
    except json.JSONDecodeError as e:
        raise ModelFolderError(url, f"not valid JSON ({e})") from None


def resolve_configuration(plans: dict, name: str, where: str) -> dict:
    """The configuration ``name`` with ``inherits_from`` resolved (the child's keys win), as nnU-Net's PlansManager."""
    configs = plans.get("configurations", {})
    chain, cfg = [], None
    while True:
        if name not in configs:
            raise ModelFolderError(where, f"plans.json has no configuration {name!r} (has {sorted(configs)})")
        if name in chain:
            raise ModelFolderError(where, f"circular inherits_from in plans.json: {chain + [name]}")
        chain.append(name)
        parent = configs[name].get("inherits_from")
        if parent is None:
            break
        name = parent
    for n in reversed(chain):
        cfg = {**(cfg or {}), **copy.deepcopy(configs[n])}
    assert cfg is not None
    return cfg


def architecture(cfg: dict, where: str) -> dict:
    """The plans' network description; older plans (UNet_class_name ...) are converted as nnU-Net converts them."""
    if "architecture" in cfg:
        return cfg["architecture"]
    unet = cfg.get("UNet_class_name")
    if unet not in ("PlainConvUNet", "ResidualEncoderUNet"):
        raise ModelFolderError(where, f"plans describe no architecture nnU-Net can rebuild (UNet_class_name={unet!r})")
    dim = len(cfg["patch_size"])
    n = len(cfg["n_conv_per_stage_encoder"])
    return {
        "network_class_name": f"dynamic_network_architectures.architectures.unet.{unet}",
        "arch_kwargs": {
            "n_stages": n,
            "features_per_stage": [min(cfg["UNet_base_num_features"] * 2 ** i, cfg["unet_max_num_features"]) for i in range(n)],
            "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
            "kernel_sizes": cfg["conv_kernel_sizes"],
            "strides": cfg["pool_op_kernel_sizes"],
            ("n_conv_per_stage" if unet == "PlainConvUNet" else "n_blocks_per_stage"): cfg["n_conv_per_stage_encoder"],
            "n_conv_per_stage_decoder": cfg["n_conv_per_stage_decoder"],
            "conv_bias": True,
            "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None, "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def detect_folds(folder: str, checkpoint_name: str) -> list[str]:
    """Folds that hold ``checkpoint_name``, sorted (fold_0, fold_1, ..., fold_all), as nnU-Net's auto-detection."""
    fs, path = storage.filesystem(folder)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        raise ModelFolderError(folder, "model folder not found") from None
    folds = []
    for e in entries:
        m = re.fullmatch(r"fold_(\d+|all)", e.rstrip("/").rsplit("/", 1)[-1])
        if m and fs.exists(f"{e.rstrip('/')}/{checkpoint_name}"):
            folds.append(m.group(1))
    return sorted(folds, key=lambda f: (f == "all", int(f) if f != "all" else 0))


def _load_checkpoint(url: str, where: str) -> dict:
    try:
        raw = storage.read_bytes(url)
    except FileNotFoundError:
        raise ModelFolderError(where, f"missing checkpoint {url}") from None
    try:
        ckpt = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception:
        # nnU-Net's trainers pickle plain Python objects beside the weights; torch's safe loader refuses some
        # (numpy scalars in the logs). Model folders are trusted like code, as nnU-Net trusts them.
        try:
            ckpt = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=False)
        except Exception as e:
            raise ModelFolderError(url, f"cannot load checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in CHECKPOINT_KEYS):
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ModelFolderError(url, f"not an nnU-Net v2 checkpoint: needs keys {CHECKPOINT_KEYS}, has {keys}")
    return ckpt


def load_v2_model_folder(folder: str, folds: list[str] | None = None,
                         checkpoint_name: str = "checkpoint_final.pth") -> NnUNetModel:
    """Loads an nnU-Net v2 trained model folder (trtseg.model_folder.load_model_folder takes v1 folders too).

    folder: URL of the folder holding dataset.json, plans.json and fold_N/ (the trainer's output folder)
    folds: e.g. ["0", "1"] or ["all"]; None detects every fold that holds ``checkpoint_name``
    checkpoint_name: checkpoint_final.pth, or checkpoint_best.pth on request
    """
    folder = str(folder).rstrip("/")
    dataset_json = _read_json(storage.join(folder, "dataset.json"), folder)
    plans = _read_json(storage.join(folder, "plans.json"), folder)
    if folds is None:
        folds = detect_folds(folder, checkpoint_name)
        if not folds:
            raise ModelFolderError(folder, f"no fold_N/{checkpoint_name} found")
    folds = [str(f) for f in folds]
    weights: dict[str, dict[str, torch.Tensor]] = {}
    digest = hashlib.sha256()
    digest.update(json.dumps(plans, sort_keys=True).encode())
    digest.update(json.dumps(dataset_json, sort_keys=True).encode())
    trainer = config_name = None
    mirror_axes: tuple[int, ...] | None = None
    for f in folds:
        ckpt_url = storage.join(folder, f"fold_{f}", checkpoint_name)
        ckpt = _load_checkpoint(ckpt_url, folder)
        this_config = ckpt["init_args"].get("configuration") if isinstance(ckpt["init_args"], dict) else None
        if trainer is None:
            trainer, config_name = ckpt["trainer_name"], this_config
            axes = ckpt.get("inference_allowed_mirroring_axes")
            mirror_axes = tuple(int(a) for a in axes) if axes is not None else None
        elif this_config != config_name or ckpt["trainer_name"] != trainer:
            raise ModelFolderError(ckpt_url, f"fold {f} was trained as {ckpt['trainer_name']}/{this_config}, "
                                             f"fold {folds[0]} as {trainer}/{config_name}; folds must agree")
        weights[f] = ckpt["network_weights"]
        for k in sorted(ckpt["network_weights"]):
            digest.update(k.encode())
            digest.update(ckpt["network_weights"][k].detach().cpu().contiguous().numpy().tobytes())
    if not config_name:
        raise ModelFolderError(folder, "checkpoint init_args has no 'configuration'")
    cfg = resolve_configuration(plans, config_name, folder)
    dims = len(cfg.get("patch_size", []))
    if dims not in (2, 3):
        raise ModelFolderError(folder, f"configuration {config_name!r} has patch_size {cfg.get('patch_size')}; "
                                       "trtseg runs 2d and 3d configurations")
    labels = LabelScheme.from_dataset_json(dataset_json, folder)
    if mirror_axes is not None and max(mirror_axes, default=0) > dims - 1:
        raise ModelFolderError(folder, f"inference_allowed_mirroring_axes {mirror_axes} do not fit a {dims}-D network")
    model = NnUNetModel(folder=folder, plans=plans, dataset_json=dataset_json, configuration_name=config_name,
                        configuration=cfg, labels=labels, trainer_name=str(trainer), mirror_axes=mirror_axes,
                        fold_weights=weights, checkpoint_name=checkpoint_name,
                        fingerprint=digest.hexdigest()[:16], _arch=architecture(cfg, folder))
    if trainer not in ("nnUNetTrainer",) and not str(trainer).startswith("nnUNetTrainer"):
        log.warning("%s: trainer %s may build a custom network; trtseg builds the one the plans describe",
                    folder, trainer)
    return model
