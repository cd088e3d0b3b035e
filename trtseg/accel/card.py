"""Model cards: how any PyTorch or ONNX 3-D segmentation network joins the nnU-Net pipeline.

A card is a small JSON or YAML file. The first four keys are required; every other has the default shown, which
is nnU-Net's behaviour:

    input_channels: 1                       # channels the network takes
    labels: {background: 0, liver: 1, tumor: 2}   # output channel i is label i (softmax/argmax), or regions:
    #   labels: {background: 0, whole: [1, 2], core: 2}  with  regions_class_order: [1, 2]  (sigmoid > 0.5)
    patch_size: [128, 128, 128]             # (z, y, x) tile the network runs on
    target_spacing: [1.0, 0.8, 0.8]         # (z, y, x) mm the network expects
    normalization: [ZScoreNormalization]    # per channel, nnU-Net's scheme names (CTNormalization, ...)
    intensity_properties: {"0": {mean: 80, std: 300, percentile_00_5: -950, percentile_99_5: 1200}}  # for CT
    use_mask_for_norm: [false]
    mirror_axes: [0, 1, 2]                  # test-time mirroring axes (z, y, x), or null
    transpose_forward: [0, 1, 2]
    network_kwargs: {}                      # keyword arguments for --network's callable
    weights: null                           # one state-dict file, a list (one per fold: 0, 1, ...), or a folder of
    #                                         fold_N.pt / fold_N.pth files (or fold_N/ folders of one file each);
    #                                         relative to the card. --weights overrides it; -f selects folds
    aggregate: logits                       # what is averaged over mirrorings, tiles and folds: logits (nnU-Net
    #                                         v2) or probabilities (softmax first, nnU-Net v1)
    preprocessing_order: normalize_then_resample   # or resample_then_normalize
    normalization_region: nonzero_crop      # or whole_volume: no crop to the nonzero box, statistics over all
    output_interpolation: linear            # the network's output back to the input's grid: linear, cubic, or
    #                                         nearest (the labels' nearest voxel)
    padding: centered                       # a volume smaller than the patch is zero-padded centered, or at the end
    postprocessing: null                    # {largest_component: [[1, 2], 1]}: keep the largest connected
    #                                         component of each label or union of labels, in order (26-neighbour,
    #                                         as nnU-Net's postprocessing.pkl)
    name: my-model

Cards turn into the same NnUNetModel the plans give (a synthesized 3-D configuration), so preprocessing, tiling,
export and every engine work unchanged. ``check_card_against_network`` refuses a card that contradicts the network;
norm layers are kept as trained (trtseg/accel/norms.py). The fingerprint, which decides reruns, covers the card, the
weights, and the source of the network's own modules (the callable's and every layer class's outside torch), or
the ONNX graph.
"""
from __future__ import annotations

import hashlib
import importlib
import io
import json
from typing import Any

import torch

from trtseg import storage
from trtseg.errors import ModelFolderError
from trtseg.accel.norms import keep_as_trained
from trtseg.model import LabelScheme, NnUNetModel, load_weights

REQUIRED = ("input_channels", "labels", "patch_size", "target_spacing")


def read_card(url: str) -> dict:
    try:
        text = storage.read_bytes(url).decode()
    except FileNotFoundError:
        raise ModelFolderError(url, "model card not found") from None
    try:
        if url.endswith((".yaml", ".yml")):
            import yaml
            card = yaml.safe_load(text)
        else:
            card = json.loads(text)
    except Exception as e:
        raise ModelFolderError(url, f"model card is not valid JSON/YAML ({e})") from None
    if not isinstance(card, dict):
        raise ModelFolderError(url, "model card must be a mapping")
    missing = [k for k in REQUIRED if k not in card]
    if missing:
        raise ModelFolderError(url, f"model card lacks {missing}")
    if len(card["patch_size"]) != 3 or len(card["target_spacing"]) != 3:
        raise ModelFolderError(url, "patch_size and target_spacing must have 3 entries (z, y, x)")
    return card


CHOICES = {"aggregate": ("logits", "probabilities"),
           "preprocessing_order": ("normalize_then_resample", "resample_then_normalize"),
           "normalization_region": ("nonzero_crop", "whole_volume"),
           "output_interpolation": ("linear", "cubic", "nearest"),
           "padding": ("centered", "end")}
_ORDER = {"linear": 1, "cubic": 3, "nearest": 0}


def _choice(card: dict, key: str) -> str:
    value = card.get(key, CHOICES[key][0])
    if value not in CHOICES[key]:
        raise ValueError(f"{key} must be one of {', '.join(CHOICES[key])}, got {value!r}")
    return value


def _configuration(card: dict) -> dict:
    n = int(card["input_channels"])
    norm = list(card.get("normalization", ["ZScoreNormalization"] * n))
    if len(norm) != n:
        raise ValueError(f"normalization lists {len(norm)} schemes for {n} channels")
    order = _ORDER[_choice(card, "output_interpolation")]
    return {
        "patch_size": [int(p) for p in card["patch_size"]], "spacing": [float(s) for s in card["target_spacing"]],
        "normalization_schemes": norm, "use_mask_for_norm": list(card.get("use_mask_for_norm", [False] * n)),
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": order, "order_z": 0,
                                               "force_separate_z": None},
        "trtseg_aggregate": _choice(card, "aggregate"),
        "trtseg_resample_first": _choice(card, "preprocessing_order") == "resample_then_normalize",
        "trtseg_crop_to_nonzero": _choice(card, "normalization_region") == "nonzero_crop",
        "trtseg_pad_side": _choice(card, "padding"),
    }


def _postprocessing(card: dict, card_url: str, labels: LabelScheme):
    """The card's postprocessing: nnU-Net's largest-component steps (trtseg/postprocess.py), or none."""
    from trtseg.postprocess import NONE, Postprocessing, Step, _flat_labels

    spec = card.get("postprocessing")
    if not spec:
        return NONE
    if not isinstance(spec, dict) or set(spec) != {"largest_component"}:
        raise ModelFolderError(card_url, "postprocessing must be {largest_component: [label or [labels], ...]}")
    targets = [tuple(int(v) for v in t) if isinstance(t, (list, tuple)) else int(t) for t in spec["largest_component"]]
    pp = Postprocessing(tuple(Step((t,)) for t in targets), card_url, "card", _flat_labels(targets))
    pp.check_labels(set(labels.foreground_labels), card_url)
    return pp


def _weight_files(spec, card_url: str) -> dict[str, str]:
    """Fold name -> weights URL: one file (fold "0"), a list (folds 0, 1, ...), or a folder of fold_N.pt/.pth
    files or fold_N/ folders holding one such file. Relative paths are relative to the card."""
    import re

    if not spec:
        return {}
    files = [spec] if isinstance(spec, str) else list(spec)
    base = card_url.rsplit("/", 1)[0] if "/" in card_url else "."
    files = [f if "://" in f or f.startswith("/") else storage.join(base, f) for f in files]
    if len(files) == 1:
        fs, path = storage.filesystem(files[0])
        if fs.isdir(path):
            found = {}
            for entry in sorted(fs.ls(path, detail=False)):
                m = re.fullmatch(r"fold_(\w+?)(\.pth?)?", entry.rstrip("/").rsplit("/", 1)[-1])
                if not m:
                    continue
                if m.group(2):
                    found[m.group(1)] = entry
                elif fs.isdir(entry):
                    inner = [e for e in sorted(fs.ls(entry, detail=False)) if e.endswith((".pt", ".pth"))]
                    if len(inner) == 1:
                        found[m.group(1)] = inner[0]
            if not found:
                raise ModelFolderError(files[0], "holds no fold_N.pt / fold_N.pth file or fold_N/ folder of one")
            protocol = files[0].split("://", 1)[0] + "://" if "://" in files[0] else ""
            return {k: protocol + v if protocol and "://" not in v else v for k, v in found.items()}
    return {str(i): f for i, f in enumerate(files)}


def _code_digest(factory, net: torch.nn.Module) -> bytes:
    """The source of the modules that define the callable and the network's layer classes (torch's own left out):
    a change to the network's code changes the fingerprint, so reruns redo the cases."""
    import inspect
    import sys

    names = {factory.__module__, *(type(m).__module__ for m in net.modules())}
    digest = hashlib.sha256()
    for name in sorted(n for n in names if n and n != "torch" and not n.startswith("torch.")):
        module = sys.modules.get(name)
        try:
            digest.update(inspect.getsource(module).encode()) if module is not None else None
        except (OSError, TypeError):  # no source (a compiled module): its name and file stand in
            digest.update(f"{name}:{getattr(module, '__file__', '')}".encode())
    return digest.digest()


def _import_callable(spec: str, where: str):
    module, _, name = spec.partition(":")
    if not name:
        raise ModelFolderError(where, f"network must be given as package.module:callable, got {spec!r}")
    try:
        obj: Any = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj
    except (ImportError, AttributeError) as e:
        raise ModelFolderError(where, f"cannot import {spec} ({e})") from None


def model_from_card(card_url: str, network: str | None = None, weights: "str | list[str] | None" = None,
                    onnx: str | None = None, folds: list[str] | None = None) -> NnUNetModel:
    """A model from a card plus either ``network`` (package.module:callable, called with the card's
    network_kwargs) and its weights (one file per fold; default the card's ``weights``), or ``onnx`` (an ONNX
    file). ``folds`` selects folds (-f)."""
    card = read_card(card_url)
    if (network is None) == (onnx is None):
        raise ModelFolderError(card_url, "give either a PyTorch network (package.module:callable) or an ONNX file")
    try:
        cfg = _configuration(card)
    except ValueError as e:
        raise ModelFolderError(card_url, str(e)) from None
    dataset_json = {"channel_names": {str(i): f"ch{i}" for i in range(int(card["input_channels"]))},
                    "labels": card["labels"], "file_ending": ".nii.gz"}
    if "regions_class_order" in card:
        dataset_json["regions_class_order"] = card["regions_class_order"]
    labels = LabelScheme.from_dataset_json(dataset_json, card_url)
    plans = {"transpose_forward": card.get("transpose_forward", [0, 1, 2]),
             "transpose_backward": [int(i) for i in torch.argsort(torch.tensor(card.get("transpose_forward", [0, 1, 2])))],
             "foreground_intensity_properties_per_channel": card.get("intensity_properties", {})}
    digest = hashlib.sha256(json.dumps(card, sort_keys=True).encode())
    mirror = card.get("mirror_axes", [0, 1, 2])
    model = NnUNetModel(folder=card_url, plans=plans, dataset_json=dataset_json, configuration_name="card",
                        configuration=cfg, labels=labels, trainer_name="card", fold_weights={"0": {}},
                        mirror_axes=tuple(mirror) if mirror is not None else None, checkpoint_name="",
                        postprocessing=_postprocessing(card, card_url, labels))
    if onnx is not None:
        raw = storage.read_bytes(onnx)
        digest.update(raw)
        model.onnx_urls = {"0": onnx}
        check_onnx_against_card(raw, model, onnx)
    else:
        _network_model(model, card, card_url, network, weights, digest)  # type: ignore[arg-type]
    model.fingerprint = digest.hexdigest()[:16]
    if folds:
        unknown = [f for f in folds if f not in model.fold_weights]
        if unknown:
            raise ModelFolderError(card_url, f"fold(s) {unknown} not among the card's {model.folds}")
        model = model.with_folds(list(folds))
    return model


def _network_model(model: NnUNetModel, card: dict, card_url: str, network: str, weights, digest) -> None:
    """Fills ``model`` with the network's factory (one state dict per fold), its notes, and the digest with the
    weights' bytes and the network's code."""
    factory = _import_callable(network, card_url)
    kwargs = card.get("network_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ModelFolderError(card_url, "network_kwargs must be a mapping of keyword arguments")
    files = _weight_files(weights if weights else card.get("weights"), card_url)
    states: dict[str, dict | None] = {}
    for fold, url in files.items():
        raw = storage.read_bytes(url)
        digest.update(fold.encode() + raw)
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        states[fold] = state.get("state_dict", state.get("network_weights", state)) if isinstance(state, dict) else state
    if not states:
        states = {"0": None}
    notes: list[str] = []

    def build(fold: str) -> torch.nn.Module:
        try:
            net = factory(**kwargs)
        except TypeError as e:
            raise ModelFolderError(card_url, f"{network}(**network_kwargs) failed: {e}") from None
        if not isinstance(net, torch.nn.Module):
            raise ModelFolderError(card_url, f"{network} returned a {type(net).__name__}, not a torch.nn.Module")
        if states[fold] is not None:
            load_weights(net, states[fold], files.get(fold, card_url), network)  # type: ignore[arg-type]
        notes[:] = keep_as_trained(net, card_url)
        return net.eval()

    model.network_factory = build
    model.fold_weights = {f: {} for f in states}
    first = build(next(iter(states)))
    check_card_against_network(first, model, card_url)
    digest.update(_code_digest(factory, first))
    model.notes = tuple(notes)


def check_card_against_network(net: torch.nn.Module, model: NnUNetModel, where: str) -> None:
    """Runs one patch through the network and compares channels and shapes with the card."""
    x = torch.zeros((1, model.num_input_channels, *model.patch_size))
    try:
        with torch.no_grad():
            y = net.eval()(x)
    except Exception as e:
        raise ModelFolderError(where, f"the network does not accept a (1, {model.num_input_channels}, "
                                      f"{', '.join(map(str, model.patch_size))}) patch as the card says: {str(e)[:200]}") from None
    if isinstance(y, (list, tuple)):
        raise ModelFolderError(where, "the network returns several outputs (deep supervision?); return one tensor")
    if tuple(y.shape) != (1, model.labels.num_heads, *model.patch_size):
        raise ModelFolderError(where, f"the network returns {tuple(y.shape)}, the card implies "
                                      f"{(1, model.labels.num_heads, *model.patch_size)}")


def check_onnx_against_card(raw: bytes, model: NnUNetModel, where: str) -> None:
    import onnx
    try:
        graph = onnx.load_model_from_string(raw).graph
    except Exception as e:
        raise ModelFolderError(where, f"not a readable ONNX model ({e})") from None
    def dims(v):
        return [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
    inp, out = dims(graph.input[0]), dims(graph.output[0])
    if len(inp) != 5 or inp[1] != model.num_input_channels:
        raise ModelFolderError(where, f"ONNX input {inp} does not take {model.num_input_channels} channel(s) as the card says")
    if len(out) != 5 or out[1] != model.labels.num_heads:
        raise ModelFolderError(where, f"ONNX output {out} does not have {model.labels.num_heads} channels as the card's labels imply")
    for got, want in zip(inp[2:], model.patch_size):
        if got is not None and got != want:
            raise ModelFolderError(where, f"ONNX input spatial shape {inp[2:]} differs from the card's patch_size {list(model.patch_size)}")
