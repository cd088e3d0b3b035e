"""Model cards that real networks fit: norm layers kept as trained, folds, the preprocessing and export choices such
networks make, network_kwargs, code in the fingerprint, and errors a user can act on."""
from __future__ import annotations

import json
import os
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from trtseg.accel.card import model_from_card
from trtseg.accel.engines import create_engines
from trtseg.cli import main
from trtseg.errors import ModelFolderError, TrtsegError
from trtseg.options import EngineSpec

from conftest import voxel_agreement, write_case

sys.path.insert(0, os.path.dirname(__file__))
import cardnet  # noqa: E402

CARD = {"input_channels": 1, "labels": {"background": 0, "a": 1, "b": 2}, "patch_size": [16, 32, 32],
        "target_spacing": [2.0, 1.0, 1.0], "normalization": ["ZScoreNormalization"], "mirror_axes": None}


def _card(folder, **fields) -> str:
    os.makedirs(str(folder), exist_ok=True)
    path = os.path.join(str(folder), "card.json")
    with open(path, "w") as f:
        json.dump({**CARD, **fields}, f)
    return path


def _mask(path: str) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


@pytest.fixture(scope="module")
def volume(tmp_path_factory) -> str:
    """One CT-like case with zero borders, anisotropic."""
    d = tmp_path_factory.mktemp("card_in")
    write_case(str(d), "v", (44, 40, 14), (1.0, 1.0, 2.6), oblique_deg=9, seed=21, zero_border=3)
    return str(d)


def test_instance_norm_in_training_mode_is_kept_in_every_engine(volume, tmp_path, monkeypatch):
    """A network whose InstanceNorm layers were trained and are used in training mode, with meaningless running
    statistics: eval mode alone would silently change its function. trtseg keeps each input's own statistics on
    PyTorch and through ONNX Runtime (the export succeeds), and its masks equal the same network written without
    running statistics at all; the run report says what was found."""
    monkeypatch.setenv("TRTSEG_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(3)
    net = cardnet.trained_norm_net()
    norm = net[1]
    norm.running_mean.fill_(40.0)  # running statistics nobody trained
    norm.running_var.fill_(0.01)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    card = _card(tmp_path)
    model = model_from_card(card, "cardnet:trained_norm_net", str(tmp_path / "w.pt"))
    assert any("kept normalizing each input by its own statistics" in n for n in model.notes), model.notes
    x = torch.randn(2, 1, 16, 32, 32)
    with torch.no_grad():
        as_trained = net.train()(x)
        today = net.eval()(x)  # what calling eval() alone did: another function
    assert (as_trained - today).abs().max() > 1.0
    for kind in ("torch", "onnxruntime"):
        engine = create_engines(model, EngineSpec(kind=kind, device="cpu"))[0]
        assert torch.allclose(engine.infer(x), as_trained, atol=1e-4), kind
    own = str(tmp_path / "own.pt")
    torch.save({k: v for k, v in net.state_dict().items() if "running" not in k and "num_batches" not in k}, own)
    common = ["predict", "-i", volume, "--card", card, "--single-process", "--no-progress"]
    assert main([*common, "--network", "cardnet:own_stats_net", "--weights", own, "-o", str(tmp_path / "ref")]) == 0
    ref = _mask(str(tmp_path / "ref" / "v.nii.gz"))
    assert len(np.unique(ref)) >= 2
    for kind in ("torch", "onnxruntime"):
        out = tmp_path / kind
        assert main([*common, "--network", "cardnet:trained_norm_net", "--weights", str(tmp_path / "w.pt"),
                     "--engine", kind, "-o", str(out)]) == 0
        assert (_mask(str(out / "v.nii.gz")) == ref).mean() >= 0.9999, kind
        notes = json.load(open(out / "run_report.json"))["model"]["notes"]
        assert "InstanceNorm" in notes[0]


def test_a_five_fold_card_is_the_mean_of_its_folds(volume, tmp_path):
    """weights: a folder of fold_N.pt files, aggregate: probabilities gives the mean of the five networks' softmax,
    equal to a hand-made ensemble module; -f selects folds."""
    folds = tmp_path / "folds"
    folds.mkdir()
    for f in range(5):
        torch.manual_seed(100 + f)
        torch.save(cardnet.sized_net(features=4).state_dict(), folds / f"fold_{f}.pt")
    card = _card(tmp_path, network_kwargs={"features": 4}, weights="folds", aggregate="probabilities")
    common = ["predict", "-i", volume, "--single-process", "--no-progress", "--engine", "torch"]
    assert main([*common, "--card", card, "--network", "cardnet:sized_net", "-o", str(tmp_path / "five")]) == 0
    report = json.load(open(tmp_path / "five" / "run_report.json"))
    assert report["model"]["folds"] == ["0", "1", "2", "3", "4"]
    hand = _card(tmp_path / "hand_card", network_kwargs={"folder": str(folds)})
    assert main([*common, "--card", hand, "--network", "cardnet:mean_softmax_of", "-o", str(tmp_path / "hand")]) == 0
    five, by_hand = (_mask(str(tmp_path / d / "v.nii.gz")) for d in ("five", "hand"))
    assert len(np.unique(five)) >= 2 and (five == by_hand).mean() >= 0.9999
    one = _mask(str(tmp_path / "five" / "v.nii.gz"))
    assert main([*common, "--card", card, "--network", "cardnet:sized_net", "-f", "0", "-o", str(tmp_path / "f0")]) == 0
    assert json.load(open(tmp_path / "f0" / "run_report.json"))["model"]["folds"] == ["0"]
    assert (_mask(str(tmp_path / "f0" / "v.nii.gz")) != one).any(), "one fold gives the five folds' mask"


def _reference_pipeline(image_file: str, net: torch.nn.Module, target_zyx, patch_zyx) -> np.ndarray:
    """The choices written out by hand: resample the whole volume (order 3, as skimage resizes), z-score over all of
    it, zero-pad at the end to the patch, one tile, crop, the logits back with order 0 (nearest), argmax."""
    from skimage.transform import resize

    img = nib.load(image_file)
    data = np.asarray(img.dataobj, dtype=np.float64).transpose(2, 1, 0)  # (z, y, x)
    spacing = np.array(img.header.get_zooms()[:3][::-1], dtype=float)
    shape = [int(round(s * sp / t)) for s, sp, t in zip(data.shape, spacing, target_zyx)]
    x = resize(data, shape, order=3, mode="edge", anti_aliasing=False)
    x = (x - x.mean()) / max(x.std(), 1e-8)
    assert all(s <= p for s, p in zip(shape, patch_zyx)), "the reference runs one tile"
    padded = np.zeros(patch_zyx)
    padded[: shape[0], : shape[1], : shape[2]] = x
    with torch.no_grad():
        logits = net.eval()(torch.from_numpy(padded[None, None]).float())[0].numpy()
    logits = logits[:, : shape[0], : shape[1], : shape[2]]
    back = np.stack([resize(c, data.shape, order=0, mode="edge", anti_aliasing=False) for c in logits])
    return back.argmax(0).transpose(2, 1, 0)  # (x, y, z) as the mask file


def test_card_choices_match_a_reference_pipeline_with_those_choices(tmp_path):
    """preprocessing_order resample_then_normalize, normalization_region whole_volume, output_interpolation nearest
    and padding end give the masks of the reference pipeline above; the default choices give other masks."""
    inp = str(tmp_path / "in")
    files = write_case(inp, "v", (30, 26, 10), (1.0, 1.0, 1.4), seed=5, zero_border=2)
    torch.manual_seed(9)
    net = cardnet.sized_net(features=8)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    patch = [16, 32, 32]
    card = _card(tmp_path, patch_size=patch, target_spacing=[1.0, 1.0, 1.0], preprocessing_order="resample_then_normalize",
                 normalization_region="whole_volume", output_interpolation="nearest", padding="end",
                 network_kwargs={"features": 8})
    common = ["predict", "-i", inp, "--single-process", "--no-progress", "--network", "cardnet:sized_net",
              "--weights", str(tmp_path / "w.pt")]
    assert main([*common, "--card", card, "-o", str(tmp_path / "choices")]) == 0
    ref = _reference_pipeline(files[0], net, (1.0, 1.0, 1.0), patch)
    ours = _mask(str(tmp_path / "choices" / "v.nii.gz"))
    assert len(np.unique(ref)) >= 2 and (ours == ref).mean() >= 0.999, (ours == ref).mean()
    default = _card(tmp_path / "default_card", **{**CARD, "patch_size": patch, "target_spacing": [1.0, 1.0, 1.0],
                                        "network_kwargs": {"features": 8}})
    assert main([*common, "--card", default, "-o", str(tmp_path / "default")]) == 0
    assert (_mask(str(tmp_path / "default" / "v.nii.gz")) == ref).mean() < 0.99


def test_card_postprocessing_keeps_the_largest_component(volume, tmp_path):
    """postprocessing: {largest_component: [[1, 2], 2]}: nnU-Net's largest-component steps (the foreground, then
    label 2), run on the mask."""
    torch.manual_seed(4)
    torch.save(cardnet.sized_net().state_dict(), tmp_path / "w.pt")
    common = ["predict", "-i", volume, "--single-process", "--no-progress", "--network", "cardnet:sized_net",
              "--weights", str(tmp_path / "w.pt")]
    plain = _card(tmp_path)
    assert main([*common, "--card", plain, "-o", str(tmp_path / "plain")]) == 0
    pp = _card(tmp_path / "pp_card", postprocessing={"largest_component": [[1, 2], 2]})
    assert main([*common, "--card", pp, "-o", str(tmp_path / "pp")]) == 0
    entry = json.load(open(tmp_path / "pp" / "run_report.json"))["cases"][0]
    assert entry["postprocessing"]["kind"] == "card" and entry["postprocessing"]["removed_voxels"] > 0
    assert voxel_agreement(str(tmp_path / "plain" / "v.nii.gz"), str(tmp_path / "pp" / "v.nii.gz")) < 1.0
    with pytest.raises(TrtsegError, match="label"):
        model_from_card(_card(tmp_path / "bad_card", postprocessing={"largest_component": [7]}), "cardnet:sized_net")


def test_a_changed_network_module_redoes_the_case(volume, tmp_path, monkeypatch):
    """The fingerprint covers the network's source: a fix in the module means a redo, not "made by the same model"."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    src = "import torch\n\n\ndef build():\n    return torch.nn.Sequential(torch.nn.Conv3d(1, 3, 1))\n"
    (pkg / "mynet_module.py").write_text(src)
    monkeypatch.syspath_prepend(str(pkg))
    card = _card(tmp_path)
    common = ["predict", "-i", volume, "-o", str(tmp_path / "out"), "--card", card, "--network", "mynet_module:build",
              "--single-process", "--no-progress"]
    assert main(common) == 0
    assert main(common) == 0
    assert json.load(open(tmp_path / "out" / "run_report.json"))["cases"][0]["status"] == "skipped"
    (pkg / "mynet_module.py").write_text(src + "\n# fixed: the wrapper's bug\n")
    assert main(common) == 0
    case = json.load(open(tmp_path / "out" / "run_report.json"))["cases"][0]
    assert case["status"] == "ok" and case["reason"] == "settings changed", case


def test_network_kwargs_and_one_line_errors(tmp_path, monkeypatch):
    """network_kwargs build a plain constructor's network; weights that do not fit, a callable that returns no
    nn.Module and a failed ONNX export each give one complete line."""
    monkeypatch.setenv("TRTSEG_CACHE", str(tmp_path / "cache"))
    torch.save(cardnet.sized_net(features=4).state_dict(), tmp_path / "w4.pt")
    torch.save(cardnet.sized_net(features=8).state_dict(), tmp_path / "w8.pt")
    card = _card(tmp_path, network_kwargs={"features": 4})
    model = model_from_card(card, "cardnet:sized_net", str(tmp_path / "w4.pt"))
    assert model.build_network("0")[0].out_channels == 4
    with pytest.raises(ModelFolderError) as e:
        model_from_card(card, "cardnet:sized_net", str(tmp_path / "w8.pt"))
    msg = str(e.value)
    assert "of another shape" in msg and "0.weight (8, 1, 3, 3, 3) in the file, (4, 1, 3, 3, 3) in the network" in msg
    assert "\n" not in msg and msg.endswith(")"), msg
    with pytest.raises(ModelFolderError, match=r"BatchNorm3d '1' is in training mode without running statistics"):
        model_from_card(_card(tmp_path / "plain_card"), "cardnet:batch_norm_net")
    with pytest.raises(ModelFolderError, match=r"cardnet:not_a_module returned a dict, not a torch.nn.Module"):
        model_from_card(_card(tmp_path / "plain_card"), "cardnet:not_a_module")
    bad = model_from_card(_card(tmp_path, input_channels=1, labels={"background": 0, "a": 1, "b": 2}),
                          "cardnet:functional_norm_net")
    with pytest.raises(TrtsegError) as e:
        create_engines(bad, EngineSpec(kind="onnxruntime", device="cpu"))
    msg = str(e.value)
    assert "ONNX export" in msg and "instance_norm" in msg and "\n" not in msg and len(msg) < 500, msg
    log = msg.rsplit("output: ", 1)[1].rstrip(")")
    assert os.path.getsize(log) > len(msg)  # the exporter's graph dump went to the log
