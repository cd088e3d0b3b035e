"""Options declared once (trtseg/options.py), the one engine text syntax, and an ONNX Runtime run that needs neither
Triton nor TensorRT."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap

import nibabel as nib
import numpy as np
import pytest

from trtseg.options import EngineSpec, OutputOptions, WindowOptions, option_flags

from conftest import write_case

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def test_cli_and_benchmarks_expose_the_same_engine_flags():
    from benchmarks import case_latency, dataset_throughput
    from trtseg.cli import _predict_parser

    engine_flags = option_flags(EngineSpec)
    assert {"--engine", "--precision", "--compile", "--fp16-weights", "--fuse-norms", "--batch-size"} <= engine_flags
    cli = _flags(_predict_parser())
    assert engine_flags | option_flags(WindowOptions) | option_flags(OutputOptions) <= cli
    for bench in (case_latency.parser(), dataset_throughput.parser()):
        got = _flags(bench)
        assert engine_flags <= got, engine_flags - got
        assert option_flags(OutputOptions) <= got
    # none of the old drifting spellings survive
    assert not {"--half-weights", "--compresslevel", "--half"} & cli


def test_engine_spec_text_syntax_round_trips():
    spec = EngineSpec.parse("torch:fp16+compile+cl+half+fold+merge+fuse+graphs")
    assert spec.kind == "torch" and spec.precision == "fp16" and spec.compile == "default"
    assert spec.channels_last and spec.fp16_weights and spec.cuda_graphs
    assert spec.rewrites == {"fold-convolutions", "merge-upsampling", "fuse-norms"}
    assert EngineSpec.parse(spec.text()) == spec
    assert EngineSpec.parse("fp16+max").compile == "max-autotune"  # no kind: torch (the benchmarks' configs)
    assert EngineSpec.parse("onnxruntime:fp16") == EngineSpec("onnxruntime", precision="fp16")
    with pytest.raises(ValueError, match="unknown engine option 'freeze'"):
        EngineSpec.parse("fp16+compile+freeze")
    with pytest.raises(ValueError, match="engine kind"):
        EngineSpec.parse("tensorflow:fp16")


def test_options_an_engine_cannot_run_are_refused_not_dropped(small_model):
    from trtseg.accel.engines import create_engines
    from trtseg.model_folder import load_model_folder

    model = load_model_folder(small_model, ["0"])
    with pytest.raises(ValueError, match="--cuda-graphs --fp16-weights --fuse-norms: CUDA only"):
        create_engines(model, EngineSpec("torch", "cpu", cuda_graphs=True, fp16_weights=True,
                                         rewrites={"fuse-norms"}))
    with pytest.raises(ValueError, match="--compile --fold-convolutions: options of the PyTorch engine"):
        create_engines(model, EngineSpec("onnxruntime", "cpu", compile="default", rewrites={"fold-convolutions"}))


def test_onnxruntime_run_without_triton_and_tensorrt(small_model, tmp_path):
    """A fresh interpreter in which triton and tensorrt cannot be imported, and TRTSEG_CONV_CONFIGS (which tunes the
    fused kernels) holds garbage: trtseg imports, runs a case on ONNX Runtime and writes the usual mask."""
    write_case(str(tmp_path / "in"), "iso", (30, 28, 12), (1.0, 1.0, 2.0), seed=32)
    script = textwrap.dedent(f"""
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("triton", "tensorrt", "tensorrt_rtx", "pycuda"):
                    raise ImportError(f"{{name}} is blocked by this test")
                return None

        sys.meta_path.insert(0, Block())
        from trtseg.cli import main
        rc = main(["predict", "-i", {str(tmp_path / "in")!r}, "-o", {str(tmp_path / "out")!r}, "-m", {small_model!r},
                   "-f", "0", "--engine", "onnxruntime", "--device", "cpu", "--disable-tta", "--single-process"])
        loaded = sorted(m for m in sys.modules
                        if m.split(".")[0] in ("triton", "tensorrt") or m.startswith("trtseg.accel.rewrites"))
        print("LOADED", loaded)
        sys.exit(rc)
    """)
    env = {**os.environ, "TRTSEG_CONV_CONFIGS": "not;a=config", "PYTHONPATH": ROOT}
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "LOADED []" in r.stdout, r.stdout
    mask = np.asarray(nib.load(tmp_path / "out" / "iso.nii.gz").dataobj)
    assert mask.shape == (30, 28, 12) and mask.dtype == np.uint8 and len(np.unique(mask)) >= 2


def test_a_malformed_kernel_setting_fails_only_where_the_fused_kernels_are_configured(monkeypatch):
    from trtseg.accel.rewrites import triton_fusion
    monkeypatch.setenv("TRTSEG_CONV_CONFIGS", "2:1,2")
    monkeypatch.setattr(triton_fusion, "_ENV_READ", False)
    monkeypatch.setattr(triton_fusion, "CONV_CONFIGS", dict(triton_fusion.CONV_CONFIGS))
    with pytest.raises(ValueError, match="TRTSEG_CONV_CONFIGS: entry '2:1,2' is not"):
        triton_fusion.conv_config(2, 32)


def test_a_handful_of_cases_runs_in_one_process_without_starting_ray(small_model, tmp_path, capsys):
    """The default `trtseg predict` (no --single-process) with fewer cases than --ray-from-cases, no cluster and no
    GPU runs in this process, says so, and reports its start-up; --ray-from-cases 0 starts Ray as before."""
    import json

    import ray

    from trtseg.cli import main

    inp = str(tmp_path / "in")
    write_case(inp, "a", (40, 36, 12), (1.0, 1.0, 2.5), seed=1)
    write_case(inp, "b", (38, 40, 12), (1.0, 1.0, 2.5), seed=2)
    common = ["predict", "-i", inp, "-m", small_model, "-f", "0", "--disable-tta", "--no-progress"]
    assert not ray.is_initialized()
    assert main([*common, "-o", str(tmp_path / "auto")]) == 0
    report = json.load(open(tmp_path / "auto" / "run_report.json"))
    assert report["job"]["mode"] == "single-process" and "--ray-from-cases" in report["job"]["chosen"]
    assert report["actors"] == [] and not ray.is_initialized()
    assert set(report["summary"]["startup_seconds"]) == {"before_engines", "engines", "warm_up"}
    assert "without Ray" in capsys.readouterr().err
    assert main([*common, "-o", str(tmp_path / "ray"), "--ray-from-cases", "0"]) == 0
    report = json.load(open(tmp_path / "ray" / "run_report.json"))
    assert report["job"]["mode"] == "cpu" and len(report["actors"]) == 1
    assert {"before_ray", "ray_start", "actors_warm_up", "to_first_tile"} <= set(report["summary"]["startup_seconds"])
    assert [c["status"] for c in report["cases"]] == ["ok", "ok"]
