"""The `trtseg` command, in nnU-Net's habits.

    trtseg predict -i INPUT -o OUTPUT -m MODEL_FOLDER [-f 0 1 ...] [--step-size 0.5] [--disable-tta]
                   [--device cpu|cuda] [--save-probabilities] [--checkpoint checkpoint_final.pth] [--engine auto]
    trtseg export  -m MODEL_FOLDER -o model.onnx [--precision fp32|fp16|int8] [--batch N | --dynamic-batch]
    trtseg build   --onnx model.onnx [--min-batch 1 --opt-batch 4 --max-batch 4] [--engine-cache URL]
    trtseg compare -m MODEL_FOLDER -i INPUT --a torch:fp32 --b onnxruntime:fp16
    trtseg demo    [--data data/demo] [--output out/demo] [PREDICT OPTIONS]
    trtseg qc      -i INPUT -o OUTPUT [--reference FOLDER]

Models are nnU-Net v2 folders (-m) or a model card (--card) with a PyTorch network (--network
package.module:callable [--weights FILE]) or an ONNX file (--onnx-model FILE); see README "Model cards".
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from trtseg.errors import TrtsegError, one_line


def _add_model_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("-m", "--model", default=None, help="nnU-Net v2 trained model folder (dataset.json, plans.json, fold_N/)")
    p.add_argument("-f", "--folds", nargs="+", default=None, help="folds (default: every fold found)")
    p.add_argument("--checkpoint", default="checkpoint_final.pth", help="checkpoint file name in each fold folder")
    p.add_argument("--card", default=None, help="model card (JSON/YAML) for a non-nnU-Net model")
    p.add_argument("--network", default=None, help="with --card: package.module:callable that returns the network")
    p.add_argument("--weights", default=None, help="with --card --network: a state dict file")
    p.add_argument("--onnx-model", default=None, help="with --card: an ONNX file instead of a PyTorch network")


def _load_model(args):
    if args.card:
        from accel.card import model_from_card
        return model_from_card(args.card, args.network, args.weights, args.onnx_model)
    if not args.model:
        raise TrtsegError("give a model: -m MODEL_FOLDER, or --card CARD with --network or --onnx-model")
    from trtseg.model import load_model_folder
    return load_model_folder(args.model, args.folds, args.checkpoint)


def _add_predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-i", "--input", required=True, help="folder (or file) of NIfTI images; any fsspec URL")
    p.add_argument("-o", "--output", required=True, help="output folder; any fsspec URL")
    _add_model_args(p)
    p.add_argument("--step-size", type=float, default=0.5, help="tile step as a fraction of the patch size")
    p.add_argument("--disable-tta", action="store_true", help="no mirroring test-time augmentation")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--engine", default="auto", choices=["auto", "tensorrt", "torch", "onnxruntime", "pycuda"],
                   help="auto: TensorRT if it imports and a GPU exists, then PyTorch CUDA, then ONNX Runtime (CPU)")
    p.add_argument("--engine-cache", default=None, help="URL for exported ONNX and built engines (default ~/.cache/trtseg)")
    p.add_argument("--precision", default=None, choices=["fp32", "fp16", "bf16"], help="engine precision (CUDA default fp16)")
    add_compile_option(p)
    p.add_argument("--cuda-graphs", action="store_true", help="capture and replay CUDA graphs (PyTorch/TensorRT on CUDA)")
    p.add_argument("--channels-last", action="store_true", help="channels-last-3d weights and tiles (PyTorch CUDA engine)")
    p.add_argument("--fp16-weights", action="store_true",
                   help="with fp16: an fp16 network with fp32 normalization layers instead of autocast (PyTorch CUDA engine)")
    p.add_argument("--fold-convolutions", action="store_true",
                   help="compute the 32-channel 3x3x3 convolutions width-folded, the same function on wider tensor-core "
                        "tiles (PyTorch CUDA engine; pays with --channels-last)")
    p.add_argument("--merge-upsampling", action="store_true",
                   help="merge each decoder stage's transposed convolution into the convolution after it, the same "
                        "function with fewer multiply-adds (PyTorch engine)")
    p.add_argument("--fuse-norms", action="store_true",
                   help="fuse InstanceNorm + LeakyReLU into the full-resolution 32-channel convolutions, the first block "
                        "and the head with Triton kernels, the same function with fewer passes over the largest "
                        "tensors (PyTorch CUDA engine; needs --fp16-weights and --channels-last)")
    p.add_argument("--batch-size", type=int, default=2, help="tiles per engine call")
    p.add_argument("--save-probabilities", action="store_true", help="also write CASE.npz/CASE.pkl as nnU-Net does")
    p.add_argument("--storage-options", default=None, help="JSON of fsspec storage options (credentials stay out of reports)")
    p.add_argument("--compress-level", type=int, default=6, help="gzip level of written masks (1 fastest, 9 smallest)")
    p.add_argument("--memory-budget-gb", type=float, default=None,
                   help="fail a case (clearly, before inference) whose volume and logits need more device memory")
    p.add_argument("--limit", type=int, default=None, help="process at most N cases")
    p.add_argument("--dry-run", action="store_true", help="list the cases that would run (and be skipped) and stop")
    p.add_argument("--overwrite", action="store_true", help="redo cases whose mask this model and these settings made")
    j = p.add_argument_group("Ray job")
    j.add_argument("--address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")
    j.add_argument("--cpu-actors", type=int, default=None, help="N inference actors on CPUs (default where no GPU: 1)")
    j.add_argument("--gpus-per-actor", type=float, default=1.0, help="GPU share per inference actor (0.5: two per GPU)")
    j.add_argument("--actor-resources", default=None,
                   help='JSON of custom Ray resources each inference actor needs, e.g. \'{"accelerator_h100": 1}\'')
    j.add_argument("--task-gpus", type=float, default=0.0, help="GPU share of preprocessing/export tasks (0: on CPUs)")
    j.add_argument("--max-cases-in-flight", type=int, default=3, help="volumes between reading and writing at once")
    j.add_argument("--tiles-per-task", type=int, default=8, help="tiles an actor takes per call")
    j.add_argument("--partials", default="fp16", choices=["fp16", "fp32"], help="dtype of partial sums sent to the reducer")
    j.add_argument("--log-json", action="store_true", help="structured JSON log lines on stderr")
    j.add_argument("--no-progress", action="store_true")
    j.add_argument("--single-process", action="store_true", help="no Ray: every stage in this process")


def add_compile_option(p: argparse.ArgumentParser) -> None:
    """--compile [default|max-autotune], for `trtseg predict` and the benchmarks; see compile_setting."""
    p.add_argument("--compile", nargs="?", const="default", default=None, choices=["default", "max-autotune"],
                   help="torch.compile the network (PyTorch CUDA engine); max-autotune also times Triton kernels "
                        "against cuDNN's, minutes of compile that Inductor's cache keeps for later runs")


def compile_setting(mode: str | None) -> bool | str:
    """--compile's value as Settings.compile: False (absent), True (default mode) or the mode's name."""
    return False if mode is None else True if mode == "default" else mode


def _settings(args):
    from trtseg.predict import Settings
    return Settings(step_size=args.step_size, use_mirroring=not args.disable_tta, device=args.device,
                    engine=args.engine, engine_cache=args.engine_cache, batch_size=args.batch_size,
                    precision=args.precision, compile=compile_setting(args.compile), cuda_graphs=args.cuda_graphs,
                    channels_last=args.channels_last, half_weights=args.fp16_weights,
                    fold_convolutions=args.fold_convolutions, merge_upsampling=args.merge_upsampling,
                    fuse_norms=args.fuse_norms, save_probabilities=args.save_probabilities, memory_budget_gb=args.memory_budget_gb,
                    compresslevel=args.compress_level)


def cmd_predict(args) -> int:
    opts = json.loads(args.storage_options) if args.storage_options else None
    if args.single_process:
        from trtseg import storage
        from trtseg.predict import predict_folder
        storage.set_default_options(opts)
        report = predict_folder(args.input, args.output, _load_model(args), args.folds, args.checkpoint,
                                _settings(args), opts, args.limit, args.dry_run)
    else:
        from jobs.config import JobConfig
        from jobs.driver import run_job
        card = ({"card": args.card, "network": args.network, "weights": args.weights, "onnx": args.onnx_model}
                if args.card else None)
        report = run_job(JobConfig(
            input=args.input, output=args.output, model=args.model, folds=args.folds, checkpoint=args.checkpoint,
            model_card=card, settings=_settings(args), storage_options=opts, address=args.address,
            cpu_actors=args.cpu_actors, gpus_per_actor=args.gpus_per_actor, task_gpus=args.task_gpus,
            actor_resources=json.loads(args.actor_resources) if args.actor_resources else None,
            max_cases_in_flight=args.max_cases_in_flight, tiles_per_task=args.tiles_per_task, partials=args.partials,
            overwrite=args.overwrite, dry_run=args.dry_run, limit=args.limit, progress=not args.no_progress,
            log_json=args.log_json))
    if report.get("dry_run"):
        return 0
    s = report["summary"]
    print(f"{s['ok']}/{s['total']} cases ok, {s['failed']} failed, {s.get('skipped', 0)} skipped, "
          f"{s['wall_seconds']} s; report: {args.output.rstrip('/')}/run_report.json")
    return 1 if s["failed"] else 0


def cmd_export(args) -> int:
    from accel.precision import make_artefact

    model = _load_model(args)
    model = model.with_folds([(args.folds or model.folds)[0]])
    report = make_artefact(model, args.output, args.precision, None if args.dynamic_batch else args.batch,
                           args.dynamic_spatial, args.calibration, args.calibration_cases, args.calibration_method,
                           args.patches, args.max_dice_drop)
    print(json.dumps({k: report[k] for k in ("vs_pytorch_fp32", "gate") if k in report}, indent=2))
    print(f"wrote {args.output} and {args.output}.report.json")
    return 0


def cmd_build(args) -> int:
    from accel.engines import default_cache
    from accel.tensorrt_build import BuildSpec, EngineCache

    spec = BuildSpec(args.min_batch, args.opt_batch, args.max_batch, args.optimization_level, args.workspace_gib,
                     args.target_cc)
    cache = EngineCache(args.engine_cache or default_cache())
    engine = cache.get_or_build(args.onnx, spec, args.precision, rebuild=args.rebuild)
    print(f"engine: {len(engine)} bytes ({'built' if cache.builds else 'from cache'}) in {cache.url}")
    return 0


def cmd_compare(args) -> int:
    from accel.compare import compare_engines, engine_from_spec
    from accel.patches import random_patches, sample_patches

    model = _load_model(args)
    fold = (args.folds or model.folds)[0]
    device = args.device or "cpu"
    a = engine_from_spec(args.a, model, device, args.engine_cache, fold)
    b = engine_from_spec(args.b, model, device, args.engine_cache, fold)
    patches = sample_patches(model, args.input, args.patches) if args.input else random_patches(model, args.patches)
    channels = list(range(model.labels.num_heads))  # Dice of the argmax over output channels
    report = {"a": args.a, "b": args.b, "source": args.input or "random", **compare_engines(a, b, patches, channels)}
    print(json.dumps(report, indent=2))
    return 0


def cmd_demo(args) -> int:
    """Segments the demo's real MRI scans with the demo's trained model, then draws and scores the masks."""
    from trtseg import demo
    from trtseg.qc import qc_folder
    root = args.output.rstrip("/")
    cases = demo.prepare_inputs(args.data, root)
    images, masks, refs = (os.path.join(root, d) for d in ("images", "masks", "reference"))
    print(f"demo: {len(cases)} real T1 scans from {args.data} ({', '.join(c.case_id for c in cases)}), "
          f"model {os.path.relpath(args.model or demo.MODEL_FOLDER)}")
    model = args.model or demo.MODEL_FOLDER
    ns = _predict_parser().parse_args(["-i", images, "-o", masks, "-m", model, *args.predict_args])
    rc = cmd_predict(ns)
    notes = {c.case_id: c.note for c in cases}
    for r in qc_folder(images, masks, refs):
        dice = f"Dice {r.dice:.4f}" if r.dice is not None else "no Dice"
        print(f"  {r.case_id}: {r.status}, {dice} ({notes.get(r.case_id, '')}); picture {r.picture}")
    print(f"QC page: {os.path.join(masks, 'qc', 'index.html')}")
    return rc


def cmd_qc(args) -> int:
    from trtseg.qc import qc_folder
    opts = json.loads(args.storage_options) if args.storage_options else None
    results = qc_folder(args.input, args.output, args.reference, opts)
    for r in results:
        dice = f", Dice {r.dice:.4f}" if r.dice is not None else ""
        print(f"{r.case_id}: {r.status}{dice}" + (f", {r.picture}" if r.picture else "") +
              (f" ({r.error})" if r.error and r.status == "qc failed" else ""))
    print(f"QC page: {args.output.rstrip('/')}/qc/index.html")
    return 1 if any(r.status == "qc failed" for r in results) else 0


def _predict_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trtseg predict")
    _add_predict_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trtseg", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="segment every case of a folder")
    _add_predict_args(p)
    p.set_defaults(func=cmd_predict)

    e = sub.add_parser("export", help="export a model to ONNX (FP32, FP16, INT8) with its check and accuracy reports")
    _add_model_args(e)
    e.add_argument("-o", "--output", required=True, help="the .onnx to write (a .report.json goes beside it)")
    e.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"])
    e.add_argument("--batch", type=int, default=1, help="static batch size")
    e.add_argument("--dynamic-batch", action="store_true", help="a dynamic batch dimension instead")
    e.add_argument("--dynamic-spatial", action="store_true", help="dynamic z, y, x too")
    e.add_argument("--calibration", default=None, help="folder of real input volumes: real patches, INT8 calibration, accuracy report")
    e.add_argument("--calibration-cases", type=int, default=4, help="cases of --calibration used for the accuracy report")
    e.add_argument("--calibration-method", default="minmax", choices=["minmax", "percentile", "entropy"])
    e.add_argument("--patches", type=int, default=4, help="random and real patches for the ONNX Runtime comparison")
    e.add_argument("--max-dice-drop", type=float, default=None, help="refuse an FP16/INT8 artefact losing more Dice vs FP32")
    e.set_defaults(func=cmd_export)

    b = sub.add_parser("build", help="build (or fetch from the cache) a TensorRT engine for an ONNX file")
    b.add_argument("--onnx", required=True)
    b.add_argument("--precision", default="fp32", help="label of the ONNX's precision (part of the cache key)")
    b.add_argument("--min-batch", type=int, default=1)
    b.add_argument("--opt-batch", type=int, default=4)
    b.add_argument("--max-batch", type=int, default=4)
    b.add_argument("--optimization-level", type=int, default=3)
    b.add_argument("--workspace-gib", type=float, default=None)
    b.add_argument("--target-cc", default=None, help="TensorRT-RTX: build ahead of time for e.g. SM89, without a GPU")
    b.add_argument("--engine-cache", default=None)
    b.add_argument("--rebuild", action="store_true")
    b.set_defaults(func=cmd_build)

    c = sub.add_parser("compare", help="run the same patches through two engines/precisions and report the gap")
    _add_model_args(c)
    c.add_argument("--a", default="torch:fp32", help="KIND[:PRECISION], or a .onnx / .engine file")
    c.add_argument("--b", required=True, help="KIND[:PRECISION], or a .onnx / .engine file")
    c.add_argument("-i", "--input", default=None, help="folder of real volumes to cut patches from (default: random)")
    c.add_argument("--patches", type=int, default=4)
    c.add_argument("--device", default=None)
    c.add_argument("--engine-cache", default=None)
    c.set_defaults(func=cmd_compare)

    d = sub.add_parser("demo", help="segment real MRI scans with the demo's trained brain-extraction model",
                       description="Segments the scans of --data (scripts/demo_data.sh) with demo/brain_model as "
                                   "`trtseg predict` does, then writes QC pictures and prints Dice. Arguments after "
                                   "the demo's own go to `trtseg predict` (e.g. --device cuda, --single-process).")
    d.add_argument("--data", default="data/demo", help="folder filled by scripts/demo_data.sh")
    d.add_argument("--output", default="out/demo")
    d.add_argument("--model", default=None, help="default: demo/brain_model of this checkout")
    d.set_defaults(func=cmd_demo)

    q = sub.add_parser("qc", help="pictures of masks over their images, an HTML page, and Dice against references")
    q.add_argument("-i", "--input", required=True, help="the images folder given to trtseg predict")
    q.add_argument("-o", "--output", required=True, help="the masks folder (with its run_report.json)")
    q.add_argument("--reference", default=None, help="folder of reference masks CASE.nii.gz, for Dice and green outlines")
    q.add_argument("--storage-options", default=None)
    q.set_defaults(func=cmd_qc)
    args, extra = parser.parse_known_args(argv)
    if args.command == "demo":  # the demo passes every option it does not know on to `trtseg predict`
        args.predict_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except (TrtsegError, FileNotFoundError) as e:
        print(f"trtseg: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # anything else that stops a run before its cases: one line, no secrets
        from trtseg import storage
        print(storage.redact(f"trtseg: error: {one_line(e, 500)}"), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
