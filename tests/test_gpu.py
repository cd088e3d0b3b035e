"""GPU paths that CI (no GPU) skips with the reason: the PyTorch CUDA engine (eager, fp16, CUDA graphs), the CUDA
predictor against the CPU predictor, and the Ray job's GPU actors."""
from __future__ import annotations


import nibabel as nib
import numpy as np
import pytest
import torch

from trtseg.accel.torch_engine import TorchEngine
from trtseg.accel.patches import random_patches
from trtseg import transfer
from trtseg.dataset import list_cases
from trtseg.model_folder import load_model_folder
from trtseg.options import EngineSpec, Settings
from trtseg.predict import Predictor

from conftest import write_case

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]


def test_pinned_copies_give_the_bytes_back_in_order():
    rng = np.random.default_rng(7)
    for _ in range(3):  # the pinned buffers are reused: each round must see its own values
        a = rng.standard_normal((2, 17, 33, 65)).astype(np.float32)
        x = transfer.to_device(a, "cuda")
        x.mul_(2)  # queued after the copy on the same stream
        back = transfer.to_host(x.permute(0, 3, 2, 1))  # a strided view comes back C-contiguous
        assert back.flags.c_contiguous and np.array_equal(back, 2 * a.transpose(0, 3, 2, 1))
    ints = (rng.integers(-1024, 3000, (1, 8, 9, 10))).astype(np.int16)
    x = transfer.to_device(ints, "cuda", torch.float32)
    assert x.dtype == torch.float32 and np.array_equal(transfer.to_host(x), ints.astype(np.float32))


def test_cuda_graphs_replay_gives_the_eager_logits(small_model):
    model = load_model_folder(small_model, ["0"])
    x = torch.from_numpy(random_patches(model, 2)).cuda()
    eager = TorchEngine(model.build_network("0"), "cuda", "fp32")
    graphs = TorchEngine(model.build_network("0"), "cuda", "fp32", cuda_graphs=True)
    a = eager.infer(x)
    for _ in range(2):  # capture, then replay
        b = graphs.infer(x)
    assert torch.allclose(a, b, atol=1e-3), (a - b).abs().max()
    assert graphs.infer(x[:1]).shape == a[:1].shape  # a second batch shape gets its own graph


def test_fp16_weights_keep_norms_fp32_and_track_autocast(small_model):
    model = load_model_folder(small_model, ["0"])
    x = torch.from_numpy(random_patches(model, 2)).cuda()
    ref = TorchEngine(model.build_network("0"), "cuda", "fp32").infer(x)
    fast = TorchEngine(model.build_network("0"), "cuda", "fp16", channels_last=True, fp16_weights=True)
    norms = [m for m in fast.network.modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    assert norms and all(p.dtype == torch.float32 for m in norms for p in m.parameters())
    out = fast.infer(x)
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.999


@pytest.mark.parametrize("options,described", [({"fold_convolutions": True}, {"folded_convolutions": 2}),
                                                ({"fold_convolutions": True, "merge_upsampling": True},
                                                 {"merged_upsamplings": 2}),
                                                ({"fold_convolutions": True, "merge_upsampling": True,
                                                  "fuse_norms": True}, {"fused_norms": 4})],
                         ids=["folded", "folded_and_merged", "folded_merged_and_fused"])
def test_compiled_fast_path_with_a_rewritten_network_gives_the_plain_logits(tmp_path, options, described):
    """--fold-convolutions (trtseg/accel/rewrites/conv_fold.py), --merge-upsampling (trtseg/accel/rewrites/upsample_merge.py) and --fuse-norms
    (trtseg/accel/rewrites/norm_fusion.py) under torch.compile in fp16 give the plain network's logits."""
    from trtseg import synthetic as syn
    folder = syn.make_model_folder(str(tmp_path / "m"), folds=(0,), patch_size=(32, 64, 64), spacing=(1.0, 1.0, 1.0),
                                   features=(32, 64, 128))
    model = load_model_folder(folder, ["0"])
    x = torch.from_numpy(random_patches(model, 2)).cuda()
    plain = TorchEngine(model.build_network("0"), "cuda", "fp16", compile=True, channels_last=True, fp16_weights=True)
    rewritten = TorchEngine(model.build_network("0"), "cuda", "fp16", compile=True, channels_last=True,
                            fp16_weights=True, **options)
    assert described.items() <= rewritten.describe().items()
    a, b = plain.infer(x), rewritten.infer(x)
    assert (b - a).abs().max() <= 0.05 * a.abs().max(), (b - a).abs().max()  # fp16 sums in another order
    assert (b.argmax(1) == a.argmax(1)).float().mean() >= 0.999


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_predictor_gives_the_cpu_masks(small_model, tmp_path, precision):
    write_case(str(tmp_path / "in"), "g", (70, 61, 23), (0.8, 0.8, 3.1), oblique_deg=20, zero_border=3)
    model = load_model_folder(small_model)
    case = list_cases(str(tmp_path / "in"), 1)[0]
    cpu = Predictor(model, Settings(engine=EngineSpec("torch", "cpu"))).predict_case(case, str(tmp_path / "cpu"))
    gpu = Predictor(model, Settings(engine=EngineSpec("torch", "cuda", precision, cuda_graphs=True))).predict_case(
        case, str(tmp_path / "gpu"))
    a = np.asarray(nib.load(cpu.output).dataobj)
    b = np.asarray(nib.load(gpu.output).dataobj)
    assert (a == b).mean() >= 0.999


def _masks(folder) -> dict:
    import os
    return {f: np.asarray(nib.load(os.path.join(folder, f)).dataobj) for f in sorted(os.listdir(folder))
            if f.endswith(".nii.gz")}


def test_ray_job_gpu_actors_give_the_single_process_masks(small_model, tmp_path):
    """The GPU actors' queued chunks, CUDA-event timing and export on a second stream and thread: two actors sharing
    the GPU (partial sums cross between them) and one compiled actor (short batches padded to the compiled batch)
    give the single-process masks; the report says how busy the engine was and what warm-up cost."""
    import json

    import ray

    from trtseg.cli import main

    inputs = str(tmp_path / "in")
    for i, (shape, spacing) in enumerate([((90, 80, 30), (0.8, 0.8, 2.5)), ((30, 28, 12), (1.0, 1.0, 2.0)),
                                          ((64, 70, 41), (0.9, 0.9, 1.5))]):
        write_case(inputs, f"c{i}", shape, spacing, oblique_deg=10 * i, seed=40 + i)
    common = ["-i", inputs, "-m", small_model, "--device", "cuda", "--engine", "torch", "--precision", "fp32",
              "--batch-size", "3", "--no-progress"]
    assert main(["predict", *common, "-o", str(tmp_path / "single"), "--single-process"]) == 0
    ray.init(address="local", num_cpus=8, num_gpus=1, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    try:
        assert main(["predict", *common, "-o", str(tmp_path / "two"), "--gpus-per-actor", "0.5", "--partials", "fp32",
                     "--tiles-per-task", "2", "--max-cases-in-flight", "3"]) == 0
        assert main(["predict", *common, "-o", str(tmp_path / "compiled"), "--compile", "--tiles-per-task", "4"]) == 0
    finally:
        ray.shutdown()
    single, two, compiled = _masks(tmp_path / "single"), _masks(tmp_path / "two"), _masks(tmp_path / "compiled")
    assert set(single) == set(two) == set(compiled) == {"c0.nii.gz", "c1.nii.gz", "c2.nii.gz"}
    # cuDNN may pick other kernels in another process, and fp32 convolutions run in TF32 by default: agreement, not
    # bit equality (one missing or doubly counted tile would change far more than 0.1 % of a volume)
    for name in single:
        assert (single[name] == two[name]).mean() >= 0.999, name
        assert (single[name] == compiled[name]).mean() >= 0.999, name
    report = json.load(open(tmp_path / "two" / "run_report.json"))
    assert report["summary"]["ok"] == 3 and len(report["actors"]) == 2
    assert any(len(c["actors"]) == 2 and c["object_store_bytes"]["partials"] > 0 for c in report["cases"])
    # each case's peak GPU memory is at least its volume's float32 bytes, and no more than the actors' overall peak
    peak = max(a["peak_gpu_memory_mb"] for a in report["actors"])
    for c in report["cases"]:
        assert c["object_store_bytes"]["volume"] / 2 ** 20 <= c["peak_gpu_memory_mb"] <= peak, c
    for a in report["actors"]:
        assert 0 < a["engine_busy_in_span"] <= 1 and a["engine_seconds"] > 0 and a["warmup_seconds"] > 0, a
        assert set(a["engine_gap_seconds"]) == {"case", "chunk", "batch"}, a
        # the GPU's busy share counts the engine plus tile gathers, accumulation and exports, each moment once
        assert a["engine_busy_in_span"] < a["tile_work_in_span"] <= a["gpu_busy_in_span"] <= 1, a
        parts = a["case_gap_seconds"]
        assert abs(parts["stream_dry"] + parts["after_entry"] - a["engine_gap_seconds"]["case"]) < 0.01, a
    comp = json.load(open(tmp_path / "compiled" / "run_report.json"))
    assert comp["actors"][0]["engine"]["compiled"] and comp["actors"][0]["warmup_seconds"] > 0


def test_the_default_on_cuda_is_the_checked_fast_path_and_a_second_process_loads_it(tmp_path):
    """No flags on CUDA: compile, channels-last, fp16 weights and every rewrite that applies, checked against fp32
    once (trtseg/accel/fast_path.py); a second process takes the verdict and the compiled code from the cache."""
    import json
    import subprocess
    import sys

    from trtseg import synthetic as syn
    from trtseg.accel.engines import create_engines
    folder = syn.make_model_folder(str(tmp_path / "m"), folds=(0,), patch_size=(32, 64, 64), spacing=(1.0, 1.0, 1.0),
                                   features=(32, 64, 128))
    model = load_model_folder(folder, ["0"])
    spec = EngineSpec(cache=str(tmp_path / "cache"))
    engine = create_engines(model, spec, "cuda")[0]
    chosen = engine.fast_path
    assert chosen["check"]["verdict"] == "passed" and chosen["check"]["from"] == "checked", chosen
    from trtseg.accel.fast_path import judge
    assert judge(chosen["check"]["agreement"], chosen["check"]["fallback_agreement"])[0] == "passed", chosen
    assert set(chosen["chosen"]) == {"compile", "channels-last", "fp16-weights", "fold-convolutions",
                                     "merge-upsampling", "fuse-norms"}, chosen
    described = engine.describe()
    assert described["compiled"] and described["fused_norms"] > 0 and described["merged_upsamplings"] > 0
    engine.warm_up((2, 1, 32, 64, 64))
    assert engine.compile_cache.status == "saved"
    code = ("import json, sys; from trtseg.model_folder import load_model_folder; from trtseg.options import "
            "EngineSpec; from trtseg.accel.engines import create_engines; m = load_model_folder(sys.argv[1], ['0']); "
            "e = create_engines(m, EngineSpec(cache=sys.argv[2]), 'cuda')[0]; e.warm_up((2, 1, 32, 64, 64)); "
            "print(json.dumps({'fast': e.fast_path, 'cache': e.describe()['compile_cache']}))")
    r = subprocess.run([sys.executable, "-c", code, folder, str(tmp_path / "cache")], capture_output=True, text=True,
                       env={**__import__("os").environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor2")})
    assert r.returncode == 0, r.stderr[-3000:]
    second = json.loads(r.stdout.strip().splitlines()[-1])
    assert second["fast"]["check"]["from"] == "cache" and second["cache"]["status"] == "loaded", second


def test_a_one_case_run_on_cuda_defaults_runs_eager_with_its_checked_parts(tmp_path):
    """One case without mirroring is below --compile-from: the default leaves compile, the fused norms and
    channels-last off (trtseg.predict.SMALL_RUN_OFF), checks what is left against fp32, and its mask is
    the fp32 CPU predictor's."""
    from trtseg import synthetic as syn
    from trtseg.options import WindowOptions
    from trtseg.predict import SMALL_RUN_OFF, predict_folder

    folder = syn.make_model_folder(str(tmp_path / "m"), folds=(0,), patch_size=(32, 64, 64), spacing=(1.0, 1.0, 1.0),
                                   features=(32, 64, 128))
    write_case(str(tmp_path / "in"), "g", (90, 81, 40), (0.8, 0.8, 1.5), oblique_deg=20, zero_border=3)
    no_tta = WindowOptions(use_mirroring=False)
    report = predict_folder(str(tmp_path / "in"), str(tmp_path / "gpu"), folder, ["0"], progress_bar=False,
                            settings=Settings(window=no_tta, engine=EngineSpec(cache=str(tmp_path / "cache"))))
    assert report["summary"]["ok"] == 1, report
    assert "--compile-from" in report["job"]["small_run"]
    fast = report["engine"]["fast_path"]
    assert not set(fast["chosen"]) & set(SMALL_RUN_OFF) and "fp16-weights" in fast["chosen"], fast
    cpu = predict_folder(str(tmp_path / "in"), str(tmp_path / "cpu"), folder, ["0"], progress_bar=False,
                         settings=Settings(window=no_tta, engine=EngineSpec("torch", "cpu", fast=False)))
    a, b = (np.asarray(nib.load(r["cases"][0]["output"]).dataobj) for r in (report, cpu))
    assert (a == b).mean() >= 0.999
