"""Model cards: how any PyTorch or ONNX 3-D segmentation network joins the nnU-Net pipeline.

A card is a small JSON or YAML file. Every key but the first four is optional:

    input_channels: 1                       # channels the network takes
    labels: {background: 0, liver: 1, tumor: 2}   # output channel i is label i (softmax/argmax), or regions:
    #   labels: {background: 0, whole: [1, 2], core: 2}  with  regions_class_order: [1, 2]  (sigmoid > 0.5)
    patch_size: [128, 128, 128]             # (z, y, x) tile the network runs on
    target_spacing: [1.0, 0.8, 0.8]         # (z, y, x) mm the network expects
    normalization: [CTNormalization]        # per channel, nnU-Net's scheme names (ZScoreNormalization, ...)
    intensity_properties: {"0": {mean: 80, std: 300, percentile_00_5: -950, percentile_99_5: 1200}}  # for CT
    use_mask_for_norm: [false]
    mirror_axes: [0, 1, 2]                  # test-time mirroring axes (z, y, x), or null
    transpose_forward: [0, 1, 2]
    name: my-model

Cards turn into the same NnUNetModel the plans give (a synthesized 3-D configuration), so preprocessing, tiling,
export and every engine work unchanged. ``check_card_against_network`` refuses a card that contradicts the network.
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
from trtseg.model import LabelScheme, NnUNetModel

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


def _configuration(card: dict) -> dict:
    n = int(card["input_channels"])
    norm = list(card.get("normalization", ["ZScoreNormalization"] * n))
    if len(norm) != n:
        raise ValueError(f"normalization lists {len(norm)} schemes for {n} channels")
    return {
        "patch_size": [int(p) for p in card["patch_size"]], "spacing": [float(s) for s in card["target_spacing"]],
        "normalization_schemes": norm, "use_mask_for_norm": list(card.get("use_mask_for_norm", [False] * n)),
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
    }


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


def model_from_card(card_url: str, network: str | None = None, weights: str | None = None,
                    onnx: str | None = None) -> NnUNetModel:
    """A model from a card plus either ``network`` (package.module:callable) and ``weights`` (a state dict file,
    optional) or ``onnx`` (an ONNX file)."""
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
                        mirror_axes=tuple(mirror) if mirror is not None else None, checkpoint_name="")
    if onnx is not None:
        raw = storage.read_bytes(onnx)
        digest.update(raw)
        model.onnx_urls = {"0": onnx}
        check_onnx_against_card(raw, model, onnx)
    else:
        factory = _import_callable(network, card_url)  # type: ignore[arg-type]
        state = None
        if weights:
            raw = storage.read_bytes(weights)
            digest.update(raw)
            state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
            state = state.get("state_dict", state.get("network_weights", state)) if isinstance(state, dict) else state

        def build(fold: str) -> torch.nn.Module:
            net = factory()
            if state is not None:
                try:
                    net.load_state_dict(state)
                except RuntimeError as e:
                    raise ModelFolderError(weights or card_url, f"weights do not fit {network}: {str(e)[:300]}") from None
            return net.eval()

        model.network_factory = build
        check_card_against_network(build("0"), model, card_url)
    model.fingerprint = digest.hexdigest()[:16]
    return model


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
