"""accel: ONNX export and checks, engines that agree, FP16/INT8 artefacts with accuracy reports, TensorRT builds
(TensorRT-RTX on the CPU), the engine cache, the TensorRT runtime's types, and clear errors."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import nibabel as nib
import pytest
import torch

from trtseg.accel.card import model_from_card
from trtseg.accel.engines import create_engines
from trtseg.accel.onnxruntime_engine import OnnxRuntimeEngine
from trtseg.accel.torch_engine import TorchEngine
from trtseg.options import EngineSpec
from trtseg.accel.onnx_export import compare_with_pytorch, export_onnx
from trtseg.accel.patches import random_patches, sample_patches
from trtseg import synthetic as syn
from trtseg.cli import main
from trtseg.errors import ModelFolderError, TrtsegError
from trtseg.model_folder import load_model_folder

from conftest import voxel_agreement, write_case

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_ABS = 1e-3  # ONNX Runtime vs PyTorch, FP32, logits of magnitude ~30


@pytest.fixture(scope="module")
def resenc_model(tmp_path_factory):
    return syn.make_model_folder(str(tmp_path_factory.mktemp("resenc")), folds=(0,), arch="ResidualEncoderUNet",
                                 patch_size=(16, 32, 32), spacing=(2.0, 1.0, 1.0), features=(4, 8, 16), seed=5)


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("calib"))
    write_case(d, "c1", (50, 44, 20), (0.9, 0.9, 2.2), oblique_deg=10, seed=21)
    write_case(d, "c2", (44, 50, 18), (1.0, 1.0, 2.5), seed=22)
    return d


@pytest.fixture(scope="module")
def card_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("card")
    card = {"name": "tiny", "input_channels": 1, "labels": {"background": 0, "a": 1, "b": 2},
            "patch_size": [16, 32, 32], "target_spacing": [2.0, 1.0, 1.0], "normalization": ["CTNormalization"],
            "intensity_properties": {"0": {"mean": 80, "std": 300, "percentile_00_5": -950, "percentile_99_5": 1200}},
            "mirror_axes": [1, 2]}
    (d / "card.json").write_text(json.dumps(card))
    torch.manual_seed(0)
    sys.path.insert(0, os.path.dirname(__file__))
    from cardnet import tiny_net
    torch.save(tiny_net().state_dict(), d / "weights.pt")
    return str(d / "card.json"), str(d / "weights.pt")


@pytest.mark.parametrize("which", ["plain", "resenc", "card"])
@pytest.mark.parametrize("batch", [1, None])
def test_export_checks_and_matches_pytorch(which, batch, small_model, resenc_model, card_model, calib_dir, tmp_path):
    if which == "card":
        model = model_from_card(card_model[0], "cardnet:tiny_net", card_model[1])
    else:
        model = load_model_folder(small_model if which == "plain" else resenc_model, ["0"])
    net = model.build_network("0")
    url = str(tmp_path / "m.onnx")
    res = export_onnx(net, url, model.num_input_channels, model.patch_size, batch=batch)  # runs onnx.checker
    assert res.input_shape[0] == batch and res.sha256
    report = compare_with_pytorch(net, url, {"random": random_patches(model, 2),
                                             "real": sample_patches(model, calib_dir, 2)})
    print(which, batch, {k: v["max_abs_error"] for k, v in report.items()})
    for name, r in report.items():
        assert r["max_abs_error"] < MAX_ABS, (name, r)
        assert r["argmax_agreement"] > 0.9999, (name, r)


def test_onnxruntime_engine_gives_the_pytorch_engines_masks(small_model, tmp_path):
    inp = str(tmp_path / "in")
    write_case(inp, "a", (60, 52, 21), (0.8, 0.8, 3.0), oblique_deg=15, seed=3, zero_border=2)
    write_case(inp, "b", (33, 40, 30), (1.2, 1.2, 1.2), seed=4)
    for engine in ("torch", "onnxruntime"):
        assert main(["predict", "-i", inp, "-o", str(tmp_path / engine), "-m", small_model, "--engine", engine]) == 0
        report = json.load(open(tmp_path / engine / "run_report.json"))
        assert report["engine"]["engine"] == engine
    for cid in ("a", "b"):
        assert voxel_agreement(str(tmp_path / "torch" / f"{cid}.nii.gz"), str(tmp_path / "onnxruntime" / f"{cid}.nii.gz")) >= 0.999


def test_channels_last_engine_gives_the_same_logits(small_model):
    model = load_model_folder(small_model, ["0"])
    x = torch.from_numpy(random_patches(model, 2))
    a = TorchEngine(model.build_network("0"), "cpu").infer(x)
    b = TorchEngine(model.build_network("0"), "cpu", channels_last=True).infer(x)
    assert b.is_contiguous() and torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    with pytest.raises(ValueError, match="fp16"):
        TorchEngine(model.build_network("0"), "cpu", fp16_weights=True)


def test_compiled_engine_pads_short_batches_to_its_static_batch(small_model):
    """A volume's last, short batch runs through the full batch's compiled graph (no second compile), and only the
    real tiles' logits come back, equal to an unpadded run."""
    model = load_model_folder(small_model, ["0"])
    x = torch.from_numpy(random_patches(model, 3))
    plain = TorchEngine(model.build_network("0"), "cpu")
    engine = TorchEngine(model.build_network("0"), "cpu", compile=True, static_batch=4)
    seen = []
    engine._fn = lambda b: (seen.append(tuple(b.shape)), plain.network(b))[1]  # the graph, not its compilation
    out = engine.infer(x)
    assert seen == [(4, *x.shape[1:])] and out.shape[0] == 3
    assert torch.allclose(out, plain.infer(x), atol=1e-5)
    assert engine.max_batch == 4 and TorchEngine(model.build_network("0"), "cpu", static_batch=4).max_batch is None
    engine.warm_up((4, *x.shape[1:]))
    assert seen[-1] == (4, *x.shape[1:])


def test_card_model_predicts_and_rejects_contradictions(card_model, tmp_path, monkeypatch):
    card, weights = card_model
    # Ray workers import the card's network module like any user package: it must be on their path
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    inp = str(tmp_path / "in")
    write_case(inp, "x", (40, 40, 16), (1.0, 1.0, 2.0), seed=8)
    assert main(["predict", "-i", inp, "-o", str(tmp_path / "out"), "--card", card, "--network", "cardnet:tiny_net",
                 "--weights", weights, "--engine", "torch"]) == 0
    assert nib.load(str(tmp_path / "out" / "x.nii.gz")).shape == (40, 40, 16)
    bad = json.loads(open(card).read())
    bad["labels"] = {"background": 0, "a": 1}  # the network has 3 outputs
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ModelFolderError, match=r"returns \(1, 3, 16, 32, 32\), the card implies \(1, 2, 16, 32, 32\)"):
        model_from_card(str(tmp_path / "bad.json"), "cardnet:tiny_net", weights)
    # an ONNX file with the same card runs under ONNX Runtime; a card that contradicts it is refused
    model = model_from_card(card, "cardnet:tiny_net", weights)
    export_onnx(model.build_network("0"), str(tmp_path / "tiny.onnx"), 1, model.patch_size, batch=None)
    onnx_model = model_from_card(card, onnx=str(tmp_path / "tiny.onnx"))
    assert isinstance(create_engines(onnx_model, EngineSpec(device="cpu"))[0], OnnxRuntimeEngine)
    with pytest.raises(ModelFolderError, match="does not have 2 channels"):
        model_from_card(str(tmp_path / "bad.json"), onnx=str(tmp_path / "tiny.onnx"))


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_reduced_precision_artefacts_carry_accuracy_reports(precision, small_model, calib_dir, tmp_path):
    out = str(tmp_path / f"m.{precision}.onnx")
    rc = main(["export", "-m", small_model, "-f", "0", "-o", out, "--precision", precision, "--dynamic-batch",
               "--calibration", calib_dir, "--max-dice-drop", "0.5"])
    assert rc == 0 and os.path.exists(out)
    report = json.load(open(out + ".report.json"))
    acc = report["accuracy_vs_fp32"]
    assert {c["case"] for c in acc["cases"]} == {"c1", "c2"}
    assert set(acc["mean_dice_vs_fp32"]) == {"1", "2"} and acc["min_voxel_agreement"] > 0.9
    assert report["accepted"] is True
    if precision == "int8":  # explicit quantization: Q/DQ nodes with zero point 0 around the convolutions
        import onnx
        ops = [n.op_type for n in onnx.load(out).graph.node]
        assert ops.count("QuantizeLinear") > 5 and ops.count("DequantizeLinear") > 5
    leftovers = sorted(p for p in os.listdir(tmp_path) if "candidate" in p or "base" in p)
    assert leftovers == [], leftovers


def test_max_dice_drop_refuses_and_writes_nothing(small_model, calib_dir, tmp_path):
    out = str(tmp_path / "m.int8.onnx")
    rc = main(["export", "-m", small_model, "-f", "0", "-o", out, "--precision", "int8", "--dynamic-batch",
               "--calibration", calib_dir, "--max-dice-drop", "0.0"])
    report = json.load(open(out + ".report.json"))
    if min(report["accuracy_vs_fp32"]["mean_dice_vs_fp32"].values()) == 1.0:
        pytest.skip("INT8 happened to be exact on these cases; nothing to refuse")
    assert rc == 2 and report["accepted"] is False and "more than --max-dice-drop 0.0" in report["gate"]
    assert not os.path.exists(out)
    assert [p for p in os.listdir(tmp_path) if p.endswith(".onnx")] == []


needs_rtx = pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None,
                               reason="tensorrt-rtx wheels not installed (they are in the test extra)")


@needs_rtx
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_rtx_builds_our_nnunet_onnx_with_the_batch_profile(precision, small_model, tmp_path, monkeypatch):
    monkeypatch.setenv("TRTSEG_TENSORRT_MODULE", "tensorrt_rtx")
    import trtseg.accel.trt_api as api
    monkeypatch.setattr(api, "_loaded", None)
    from trtseg.accel.tensorrt_build import BuildSpec, EngineCache

    model = load_model_folder(small_model, ["0"])
    onnx_url = str(tmp_path / f"m.{precision}.onnx")
    export_onnx(model.build_network("0"), onnx_url, 1, model.patch_size, batch=None, precision=precision)
    cache = EngineCache(str(tmp_path / "cache"))
    spec = BuildSpec(min_batch=1, opt_batch=2, max_batch=4, optimization_level=0, target_cc="SM89")
    engine = cache.get_or_build(onnx_url, spec, precision)
    assert len(engine) > 10_000 and cache.builds == 1
    metas = [json.load(open(os.path.join(r, f))) for r, _, fs in os.walk(tmp_path / "cache" / "engines") for f in fs if f.endswith(".json")]
    assert metas[0]["io"]["inputs"][0]["shape"] == [-1, 1, *model.patch_size]
    assert metas[0]["spec"]["max_batch"] == 4 and metas[0]["target"]["compute_capability"] == "sm89"


@needs_rtx
def test_engine_cache_keys_and_rebuild_rules(small_model, tmp_path, monkeypatch):
    monkeypatch.setenv("TRTSEG_TENSORRT_MODULE", "tensorrt_rtx")
    import trtseg.accel.trt_api as api
    monkeypatch.setattr(api, "_loaded", None)
    from trtseg.accel.tensorrt_build import BuildSpec, EngineCache

    model = load_model_folder(small_model, ["0"])
    a, b = str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx")
    export_onnx(model.build_network("0"), a, 1, model.patch_size, batch=None)
    export_onnx(load_model_folder(small_model, ["1"]).build_network("1"), b, 1, model.patch_size, batch=None)
    url = str(tmp_path / "cache")
    spec = BuildSpec(1, 2, 4, optimization_level=0, target_cc="SM89")
    first = EngineCache(url)
    first.get_or_build(a, spec, "fp32")
    again = EngineCache(url)  # another process, same GPU type: reuse
    again.get_or_build(a, spec, "fp32")
    assert again.builds == 0
    changed = EngineCache(url)
    changed.get_or_build(a, BuildSpec(1, 2, 8, optimization_level=0, target_cc="SM89"), "fp32")  # new profile
    changed.get_or_build(b, spec, "fp32")  # new ONNX
    changed.get_or_build(a, BuildSpec(1, 2, 4, optimization_level=0, target_cc="SM86"), "fp32")  # new GPU type
    assert changed.builds == 3
    forced = EngineCache(url)
    forced.get_or_build(a, spec, "fp32", rebuild=True)
    assert forced.builds == 1
    engines = [f for r, _, fs in os.walk(url) for f in fs if f.endswith(".engine")]
    assert len(engines) == 4
    assert os.listdir(os.path.join(url, "timing"))
    # an engine whose metadata says another TensorRT made it is refused, with a message that says so
    lone = str(tmp_path / "lone")
    EngineCache(lone).get_or_build(a, spec, "fp32")
    (meta_path,) = [os.path.join(r, f) for r, _, fs in os.walk(lone) for f in fs if f.endswith(".json")]
    meta = json.load(open(meta_path))
    meta["target"]["trt_version"] = "10.0.0"
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(TrtsegError, match=r"built with tensorrt_rtx 10.0.0, the local machine has tensorrt_rtx 1\."):
        EngineCache(lone).get_or_build(a, spec, "fp32")
    meta["target"]["trt_version"] = api.version()
    meta["target"]["gpu_name"] = "NVIDIA A10G"
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(TrtsegError, match=r"built for NVIDIA A10G \(sm89\), this GPU is any-SM89"):
        EngineCache(lone).get_or_build(a, spec, "fp32")


@needs_rtx
def test_an_engine_built_for_another_model_is_refused(small_model, resenc_model, tmp_path, monkeypatch):
    monkeypatch.setenv("TRTSEG_TENSORRT_MODULE", "tensorrt_rtx")
    import trtseg.accel.trt_api as api
    monkeypatch.setattr(api, "_loaded", None)
    from trtseg.accel.tensorrt_build import BuildSpec, EngineCache, check_engine_fits

    small = load_model_folder(small_model, ["0"])
    export_onnx(small.build_network("0"), str(tmp_path / "s.onnx"), 1, small.patch_size, batch=None)
    EngineCache(str(tmp_path / "c")).get_or_build(str(tmp_path / "s.onnx"), BuildSpec(1, 1, 2, 0, None, "SM89"), "fp32")
    (meta_path,) = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "c") for f in fs if f.endswith(".json")]
    meta = json.load(open(meta_path))
    check_engine_fits(meta, small, "s.engine")  # its own model: fine
    with pytest.raises(TrtsegError, match=r"s.engine: built for another model \(input \[-1, 1, 24, 32, 40\]"):
        check_engine_fits(meta, load_model_folder(resenc_model, ["0"]), "s.engine")


def test_bad_onnx_and_engine_files_give_clear_errors(small_model, tmp_path):
    from trtseg.accel.tensorrt_build import engine_file_meta

    with pytest.raises(TrtsegError, match="missing.onnx: ONNX file not found"):
        OnnxRuntimeEngine(str(tmp_path / "missing.onnx"))
    (tmp_path / "corrupt.onnx").write_bytes(b"\x08\x07garbage")
    with pytest.raises(TrtsegError, match="corrupt.onnx: not a usable ONNX model"):
        OnnxRuntimeEngine(str(tmp_path / "corrupt.onnx"))
    with pytest.raises(TrtsegError, match="x.engine: engine file not found"):
        engine_file_meta(str(tmp_path / "x.engine"))
    (tmp_path / "y.engine").write_bytes(b"not an engine")
    with pytest.raises(TrtsegError, match="no y.json beside it"):
        engine_file_meta(str(tmp_path / "y.engine"))


def test_tensorrt_runtime_type_checks_against_tensorrt_stubs():
    stubs = os.path.join(ROOT, ".venv", "typestubs", "tensorrt")
    if not os.path.isdir(stubs):
        pytest.fail("tensorrt-stubs missing: scripts/install.sh installs them into .venv/typestubs")
    files = ["trtseg/accel/trt_api.py", "trtseg/accel/tensorrt_build.py", "trtseg/accel/tensorrt_runtime.py",
             "trtseg/accel/pycuda_runtime.py"]
    r = subprocess.run([sys.executable, "-m", "mypy", *files], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _real_tensorrt_and_gpu() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    try:
        import tensorrt  # noqa: F401
        if not hasattr(tensorrt, "Builder"):
            return "tensorrt is not installed (only type stubs)"
    except ImportError:
        return "tensorrt is not installed (pip install 'trtseg[tensorrt]')"
    return None


@pytest.mark.gpu
@pytest.mark.skipif(_real_tensorrt_and_gpu() is not None, reason=str(_real_tensorrt_and_gpu()))
def test_tensorrt_engine_matches_pytorch_on_gpu(small_model, tmp_path):
    model = load_model_folder(small_model, ["0"])
    trt_engine = create_engines(model, EngineSpec("tensorrt", "cuda", "fp32", cache=str(tmp_path / "cache")))[0]
    ref = TorchEngine(model.build_network("0"), "cuda", "fp32")
    x = torch.from_numpy(random_patches(model, 3)).cuda()
    a, b = ref.infer(x), trt_engine.infer(x)
    assert (a.argmax(1) == b.argmax(1)).float().mean().item() > 0.999
    assert (a - b).abs().max().item() < 1e-2


def test_models_over_2gb_export_with_external_data(small_model, tmp_path, monkeypatch):
    import trtseg.accel.onnx_export as ox
    monkeypatch.setattr(ox, "EXTERNAL_DATA_LIMIT", 1024)  # the 2 GB path, on a small model
    model = load_model_folder(small_model, ["0"])
    url = str(tmp_path / "big.onnx")
    res = export_onnx(model.build_network("0"), url, 1, model.patch_size, batch=None)
    assert res.external_data == "big.onnx.data" and os.path.getsize(url + ".data") > os.path.getsize(url)
    report = compare_with_pytorch(model.build_network("0"), url, {"random": random_patches(model, 1)})
    assert report["random"]["max_abs_error"] < MAX_ABS


def test_memory_storage_single_process(small_model, tmp_path):
    import fsspec
    fs = fsspec.filesystem("memory")
    src = write_case(str(tmp_path / "in"), "m", (30, 30, 12), (1.0, 1.0, 2.0), seed=3)[0]
    fs.pipe("/mem_in/m_0000.nii.gz", open(src, "rb").read())
    assert main(["predict", "-i", "memory://mem_in", "-o", "memory://mem_out", "-m", small_model, "--single-process",
                 "--engine", "onnxruntime"]) == 0
    assert fs.exists("/mem_out/m.nii.gz") and fs.exists("/mem_out/run_report.json")
