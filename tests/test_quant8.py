"""The 8-bit core (trtseg/accel/quant8.py) on the CPU: exact quantize/dequantize round trips, per-channel weight
scales, the three calibration methods, the reference network against the fp32 one through the accuracy gate (a
deliberately bad calibration refused), and the calibration's cache key."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from trtseg.accel import quant8
from trtseg.accel.precision import accuracy_report, gate
from trtseg.accel.torch_engine import TorchEngine
from trtseg.pipeline import mask_predictor
from trtseg.dataset import list_cases
from trtseg.model_folder import load_model_folder

from conftest import write_case


def test_every_fp8_value_and_every_int8_value_round_trips_exactly():
    codes = torch.arange(256, dtype=torch.int16).to(torch.uint8).view(torch.float8_e4m3fn)
    finite = codes[~torch.isnan(codes.float())]
    for scale in (1.0, 0.0123, 37.5):
        values = finite.float() * scale
        again = quant8.quantize(quant8.dequantize(finite, scale), scale, "fp8")
        assert torch.equal(again.view(torch.uint8), finite.view(torch.uint8)), scale
        assert torch.equal(quant8.dequantize(quant8.quantize(values, scale, "fp8"), scale), values)
    ints = torch.arange(-127, 128, dtype=torch.int8)
    assert torch.equal(quant8.quantize(quant8.dequantize(ints, 0.25), 0.25, "int8"), ints)
    # saturation at the largest finite value, never inf or NaN; int8 rounds half to even
    assert quant8.quantize(torch.tensor([1e6, -1e6]), 1.0, "fp8").float().tolist() == [448.0, -448.0]
    assert quant8.quantize(torch.tensor([1e6, -1e6, 2.5, 3.5, -2.5]), 1.0, "int8").tolist() == [127, -127, 2, 4, -2]


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_weight_scales_map_each_output_channels_largest_weight_to_the_formats_largest_value(fmt):
    conv, up = torch.nn.Conv3d(3, 5, 3), torch.nn.ConvTranspose3d(4, 6, 2, stride=2)
    for layer in (conv, up):
        axis = quant8.weight_axis(layer)
        s = quant8.weight_scales(layer.weight, fmt, axis)
        q = quant8.quantize(layer.weight, s, fmt).float()
        dims = [d for d in range(q.dim()) if d != axis]
        assert torch.equal(q.abs().amax(dim=dims), torch.full((layer.weight.shape[axis],), quant8.FORMATS[fmt][1]))
    zero = torch.zeros(2, 1, 3, 3, 3)
    assert torch.equal(quant8.dequantize(quant8.quantize(zero, quant8.weight_scales(zero, fmt), fmt),
                                         quant8.weight_scales(zero, fmt)), zero)


class _Net(torch.nn.Module):
    """Two convolutions and a head: the head is not quantized."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv3d(1, 4, 3, padding=1)
        self.b = torch.nn.Conv3d(4, 4, 3, padding=1)
        self.seg_layers = torch.nn.ModuleList([torch.nn.Conv3d(4, 3, 1)])

    def forward(self, x):
        return self.seg_layers[0](torch.relu(self.b(torch.relu(self.a(x)))))


def test_the_calibration_methods_clip_outliers_as_they_should():
    torch.manual_seed(0)
    net = _Net()
    x = torch.distributions.Laplace(0.0, 1.0).sample((2, 1, 32, 32, 32))  # 65,536 values: 99.99 % leaves out 6
    x[0, 0, 0, 0, 0] = 80.0  # one outlier
    assert set(quant8.quantizable_layers(net)) == {"a", "b"}
    got = {m: quant8.calibrate(net, x, "int8", m) for m in quant8.METHODS}
    assert got["minmax"]["a"] == pytest.approx(80.0 / 127)
    # the 99.99th percentile and the entropy threshold ignore the one outlier; both stay above the bulk
    bulk = float(np.percentile(x.abs().numpy(), 99.0))
    for m in ("percentile", "entropy"):
        assert bulk / 127 < got[m]["a"] < 0.5 * got["minmax"]["a"], (m, got[m]["a"])
    assert quant8.calibrate(net, x, "int8", "entropy") == got["entropy"]  # deterministic
    with pytest.raises(ValueError, match="calibration method"):
        quant8.calibrate(net, x, "int8", "mse")


def test_the_reference_network_passes_the_gate_and_a_bad_calibration_is_refused(small_model, tmp_path):
    """The model's fold 0 in fp8 and int8, calibrated on real patches, against fp32 through whole cases: the
    accuracy gate accepts it at a --max-dice-drop that the same network with input scales 1000 times too small
    (every activation saturated) exceeds, and the default --max-dice-drop refuses it."""
    from trtseg.accel.patches import sample_patches

    cases_dir = str(tmp_path / "cal")
    write_case(cases_dir, "c1", (40, 36, 14), (1.0, 1.0, 2.6), seed=5, zero_border=2)
    write_case(cases_dir, "c2", (44, 40, 12), (0.9, 0.9, 3.0), seed=6)
    model = load_model_folder(small_model, ["0"])
    net = model.build_network("0").eval()
    patches = torch.from_numpy(sample_patches(model, cases_dir, 4, seed=1))
    cases = list_cases(cases_dir, model.num_image_channels)
    predict = mask_predictor(model)
    fp32 = [TorchEngine(net, "cpu")]
    for fmt in ("fp8", "int8"):
        scales = quant8.calibrate(net, patches, fmt, "percentile")
        good = accuracy_report(model, fp32, [TorchEngine(quant8.quantize_network(net, scales, fmt), "cpu")], cases,
                               predict)
        bad_scales = {n: s / 1000 for n, s in scales.items()}
        bad = accuracy_report(model, fp32, [TorchEngine(quant8.quantize_network(net, bad_scales, fmt), "cpu")],
                              cases, predict)
        # the test model is small with random weights, so 8 bits move its masks more than a trained network's:
        # every layer quantized, fp8 agreed on 0.960 of voxels (label 1's Dice 0.77), int8 on 0.982 (0.88), the bad
        # calibration on 0.49
        assert good["min_voxel_agreement"] > 0.95 and bad["min_voxel_agreement"] < 0.6, (fmt, good, bad)
        ok, why = gate(good, 0.3)
        assert ok, (fmt, why)
        refused, why = gate(bad, 0.3)
        assert not refused and "more than --max-dice-drop 0.3" in why, (fmt, bad)
        refused, why = gate(good, 0.005)  # the default --max-dice-drop refuses what this model loses
        assert not refused, (fmt, why)


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_every_calibrated_layer_of_an_nnunet_network_runs_quantized(small_model, fmt):
    """nnU-Net's blocks call their convolution through a Sequential that holds it besides their ``conv`` attribute:
    the reference network quantizes every calibrated layer on the forward pass, not only the attributes."""
    model = load_model_folder(small_model, ["0"])
    net = model.build_network("0").eval()
    x = torch.randn(1, 1, *[min(s, 32) for s in model.patch_size])
    scales = quant8.calibrate(net, x, fmt, "minmax")
    ran = []
    q = quant8.quantize_network(net, scales, fmt)
    for m in q.modules():
        if isinstance(m, quant8.QuantConv):
            m.register_forward_hook(lambda *_: ran.append(1))
    with torch.no_grad():
        q(x)
    assert len(scales) > 4 and len(ran) == len(scales)


def test_the_calibration_key_covers_what_the_scales_depend_on():
    base = dict(model_fingerprint="abc", fold="0", fmt="fp8", method="entropy", calibration_identity="size:1:mtime:2",
                patch_shape=(128, 128, 128))
    key, fields = quant8.calibration_key(**base)
    assert fields["format"] == "fp8" and fields["patch"] == [128, 128, 128]
    for change in (dict(model_fingerprint="abd"), dict(fold="1"), dict(fmt="int8"), dict(method="minmax"),
                   dict(calibration_identity="size:1:mtime:3"), dict(patch_shape=(96, 128, 128))):
        assert quant8.calibration_key(**{**base, **change})[0] != key, change
    assert quant8.calibration_key(**base)[0] == key


@pytest.fixture(scope="module")
def calibration_cases(tmp_path_factory) -> str:
    d = str(tmp_path_factory.mktemp("eight_bit") / "in")
    write_case(d, "c1", (40, 36, 14), (1.0, 1.0, 2.6), seed=5, zero_border=2)
    write_case(d, "c2", (44, 40, 12), (0.9, 0.9, 3.0), seed=6)
    return d


def _predict(model, cases, out, cache, precision, **engine):
    from trtseg.options import EngineSpec, Settings
    from trtseg.predict import predict_folder

    spec = EngineSpec(device="cpu", cache=cache, precision=precision, **engine)
    return predict_folder(cases, out, model, ["0"], settings=Settings(engine=spec), progress_bar=False)


def test_predict_int8_calibrates_on_its_input_gates_against_fp32_and_reuses_the_calibration(
        small_model, calibration_cases, tmp_path):
    """`trtseg predict --precision int8` (its 8-bit layers run quant8's reference on the CPU): the first run
    calibrates on its own input and passes the gate at --max-dice-drop 0.3, the report says so, and its masks stay
    close to fp32's; a second process loads the calibration from the engine cache; replacing a calibration volume
    calibrates again; the default --max-dice-drop refuses this random network, naming the model and the entry, and
    writes no mask."""
    import shutil

    import nibabel as nib

    calibration_cases = shutil.copytree(calibration_cases, str(tmp_path / "in"))  # one of them is replaced below
    cache = str(tmp_path / "cache")
    fp32 = _predict(small_model, calibration_cases, str(tmp_path / "fp32"), cache, "fp32")
    first = _predict(small_model, calibration_cases, str(tmp_path / "a"), cache, "int8", max_dice_drop=0.3)
    engine = first["engine"]
    assert first["summary"]["ok"] == 2 and engine["precision"] == "int8" and engine["quantized_convolutions"] > 4
    cal = engine["calibration"]
    assert cal["from"] == "calibrated" and cal["accepted"] and cal["method"] == "percentile"
    assert cal["calibration"] == calibration_cases and sorted(cal["cases"]) == ["c1", "c2"]
    assert set(cal["accuracy_vs_fp32"]["mean_dice_vs_fp32"]) == {"1", "2"}
    assert cal["engine"] == {k: engine[k] for k in cal["engine"]} and not cal["engine"]["compiled"]  # what ran
    for case in ("c1", "c2"):
        a, b = (np.asarray(nib.load(str(tmp_path / d / f"{case}.nii.gz")).dataobj) for d in ("fp32", "a"))
        assert 0.95 < (a == b).mean() < 1.0, case  # 8 bits move some voxels of this random network, not many
    assert fp32["engine"].get("calibration") is None
    again = _predict(small_model, calibration_cases, str(tmp_path / "b"), cache, "int8", max_dice_drop=0.3)
    assert again["engine"]["calibration"]["from"] == "cache"
    assert again["engine"]["calibration"]["entry"] == cal["entry"]
    write_case(calibration_cases, "c2", (44, 40, 12), (0.9, 0.9, 3.0), seed=7)  # a replaced volume
    replaced = _predict(small_model, calibration_cases, str(tmp_path / "c"), cache, "int8", max_dice_drop=0.3)
    assert replaced["engine"]["calibration"]["from"] == "calibrated"
    assert replaced["engine"]["calibration"]["entry"] != cal["entry"]
    from trtseg.errors import TrtsegError
    with pytest.raises(TrtsegError, match=r"--precision int8 refused: label \d loses .* more than --max-dice-drop "
                                          r"0.005 .*report: .*calibration"):
        _predict(small_model, calibration_cases, str(tmp_path / "d"), cache, "int8")
    assert not list((tmp_path / "d").glob("*.nii.gz"))
    # the refusal came from the cached report, judged by the default drop: the entry is the one calibrated above
    entries = list((tmp_path / "cache" / "calibration").rglob("*.json"))
    assert len(entries) == 2 and replaced["engine"]["calibration"]["entry"] in {str(e) for e in entries}


def test_the_gate_judges_the_compiled_engine_the_run_then_uses(small_model, calibration_cases, tmp_path,
                                                                monkeypatch):
    """Compiled code rounds a fused chain's intermediates differently from eager code (tests/test_conv8.py), so
    the gate runs the engine as the run builds it: with --compile, the compiled 8-bit engine, which the run then
    uses without building another. A later process builds one engine from the cached entry; an uncompiled engine
    has its own entry. The compiled code is keyed by the scales it holds as constants."""
    import json

    from trtseg.accel import compile_cache, engines
    from trtseg.model_folder import load_model_folder
    from trtseg.options import EngineSpec

    built = []
    real = engines.torch_engine
    monkeypatch.setattr(engines, "torch_engine", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    model = load_model_folder(small_model, ["0"])

    def engine(**options):
        spec = EngineSpec(device="cpu", cache=str(tmp_path / "cache"), precision="int8", fast=False,
                          calibration=calibration_cases, max_dice_drop=0.3, **options)
        return engines.build_engine(model, "0", spec, "torch", torch.device("cpu"), spec.cache)

    compiled = engine(compile="default")
    assert compiled.compiled and compiled.calibration["from"] == "calibrated"
    assert compiled.calibration["engine"]["compiled"] and compiled.calibration["engine"]["compile_mode"] == "default"
    assert built == [compiled]  # the engine the gate judged is the run's
    again = engine(compile="default")
    assert again.calibration["from"] == "cache" and len(built) == 2
    assert again.calibration["entry"] == compiled.calibration["entry"]
    # its compiled code holds the scales as constants, and is keyed by them: a new calibration loads no old code
    with open(compiled.calibration["entry"]) as f:
        scales = json.load(f)["calibration"]["scales"]
    spec = EngineSpec(device="cpu", precision="int8", compile="default", fast=False)
    fields = compiled.compile_cache.fields
    assert fields == compile_cache.model_key_fields(model, "0", spec, torch.device("cpu"), scales)
    other = {k: v * 1.01 for k, v in scales.items()}
    assert compile_cache.model_key_fields(model, "0", spec, torch.device("cpu"), other) != fields
    eager = engine()
    assert eager.calibration["from"] == "calibrated" and eager.calibration["entry"] != compiled.calibration["entry"]
    assert not eager.calibration["engine"]["compiled"]


def test_compare_shows_an_8_bit_engine_against_fp32_with_its_calibration(small_model, calibration_cases, tmp_path,
                                                                         capsys):
    import json
    from trtseg.cli import main

    rc = main(["compare", "-m", small_model, "-i", calibration_cases, "--a", "torch:fp32", "--b", "torch:fp8",
               "--max-dice-drop", "0.5", "--engine-cache", str(tmp_path / "cache"), "-f", "0"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["b"] == "torch:fp8" and "calibration_a" not in report
    assert report["calibration_b"]["accepted"] and report["calibration_b"]["from"] == "calibrated"
    assert 0.5 < min(report["dice_per_label"].values()) < 1.0 and report["max_abs_error"] > 0
