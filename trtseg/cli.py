"""The `trtseg` command, in nnU-Net's habits.

    trtseg predict -i INPUT -o OUTPUT -m MODEL_FOLDER [-f 0 1 ...] [--step-size 0.5] [--disable-tta]
                   [--device cpu|cuda] [--save-probabilities] [--checkpoint checkpoint_final.pth] [--engine auto]
    trtseg export  -m MODEL_FOLDER -o model.onnx [--precision fp32|fp16|int8] [--batch N | --dynamic-batch]
    trtseg build   --onnx model.onnx [--min-batch 1 --opt-batch 4 --max-batch 4] [--engine-cache URL]
    trtseg compare -m MODEL_FOLDER -i INPUT --a torch:fp32 --b onnxruntime:fp16
    trtseg demo    [--data data/demo] [--output out/demo] [PREDICT OPTIONS]
    trtseg qc      -i INPUT -o OUTPUT [--reference FOLDER]

Models are nnU-Net v2 folders (-m) or a model card (--card) with a PyTorch network (--network
package.module:callable [--weights FILE]) or an ONNX file (--onnx-model FILE); see docs/engines.md, "Model cards".
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from trtseg.errors import TrtsegError, one_line


def _add_model_args(p: argparse.ArgumentParser, required: bool = False, folds: bool = True) -> None:
    p.add_argument("-m", "--model", nargs="+", default=None, help="nnU-Net trained model folder(s) (dataset.json, "
                   "plans.json, fold_N/); several: an ensemble of configurations (the mean of their probabilities, "
                   "as nnUNetv2_ensemble), a 3d_lowres folder beside its 3d_cascade_fullres one is the cascade's "
                   "first stage")
    p.add_argument("-d", "--dataset", default=None, help="nnUNetv2_predict's addressing instead of -m: the dataset's "
                   "name or id, resolved with -c/-tr/-p under $nnUNet_results")
    p.add_argument("-c", "--configuration", nargs="+", default=None, help="with -d: the configuration(s) (3d_fullres, "
                   "2d, ...; several as for -m)")
    p.add_argument("-tr", "--trainer", default="nnUNetTrainer", help="with -d: the trainer class name")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="with -d: the plans identifier")
    if folds:  # `trtseg predict` takes -f from WindowOptions (trtseg/options.py)
        p.add_argument("-f", "--folds", nargs="+", default=None, help="folds (default: every fold found)")
    p.add_argument("--checkpoint", "-chk", default="checkpoint_final.pth", help="checkpoint file name in each fold folder")
    p.add_argument("--card", default=None, help="model card (JSON/YAML) for a non-nnU-Net model")
    p.add_argument("--network", default=None, help="with --card: package.module:callable that returns the network")
    p.add_argument("--weights", nargs="+", default=None, help="with --card --network: a state dict file, one per "
                   "fold, or a folder of fold_N files (default: the card's weights)")
    p.add_argument("--onnx-model", default=None, help="with --card: an ONNX file instead of a PyTorch network")


def _resolve_model_folder(args) -> None:
    """-d/-c/-tr/-p (nnUNetv2_predict's addressing) -> args.model, the folder nnU-Net would read."""
    if getattr(args, "dataset", None):
        if args.model:
            raise TrtsegError("give the model once: -m FOLDER, or -d DATASET -c CONFIGURATION")
        if not args.configuration:
            raise TrtsegError("-d needs -c CONFIGURATION (3d_fullres, 2d, 3d_lowres, ...)")
        from trtseg.nnunet_paths import model_folder
        args.model = [model_folder(args.dataset, c, args.trainer, args.plans) for c in args.configuration]
        args.dataset = None  # resolved


def _load_model(args, several: bool = False):
    """The model of -m/-d or --card; with ``several`` (predict) the run's ModelSet (trtseg/ensemble.py)."""
    _resolve_model_folder(args)
    if args.card:
        from trtseg.accel.card import model_from_card
        return model_from_card(args.card, args.network, args.weights, args.onnx_model, args.folds)
    if not args.model:
        raise TrtsegError("give a model: -m MODEL_FOLDER, or --card CARD with --network or --onnx-model")
    from trtseg.model_folder import load_model_folder, load_models
    if several:
        return load_models(args.model, args.folds, args.checkpoint)
    if len(args.model) > 1:
        raise TrtsegError(f"this command takes one model folder, got {len(args.model)}: {' '.join(args.model)}")
    return load_model_folder(args.model[0], args.folds, args.checkpoint)


# JobConfig fields that are flags of `trtseg predict` (the rest are set from other flags or are internal)
_JOB_FLAGS = ("overwrite", "dry_run", "limit", "allow_empty", "input_identity", "shard", "address", "cpu_actors",
              "ray_from_cases", "gpus_per_actor", "actor_resources",
              "task_gpus", "max_cases_in_flight", "tiles_per_task", "partials", "log_json", "progress",
              "diagnostics")


def _add_predict_args(p: argparse.ArgumentParser) -> None:
    """`trtseg predict`'s flags: the input and output, the model, then the declared options (trtseg/options.py for
    the window, engine and output; trtseg/jobs/config.py for the Ray job)."""
    from trtseg.jobs.config import COMMON_FLAGS, JobConfig
    from trtseg.options import add_options, add_settings

    p.add_argument("-i", "--input", required=True, help="folder (or file) of NIfTI images; any fsspec URL")
    p.add_argument("-o", "--output", required=True, help="output folder; any fsspec URL")
    _add_model_args(p, folds=False)
    add_settings(p)
    p.add_argument("--storage-options", default=None, help="JSON of fsspec storage options (credentials stay out of reports)")
    add_options(p, JobConfig, only=COMMON_FLAGS)
    j = p.add_argument_group("Ray job")
    add_options(j, JobConfig, only=tuple(f for f in _JOB_FLAGS if f not in COMMON_FLAGS))
    j.add_argument("--single-process", action="store_true", help="no Ray: every stage in this process")


def cmd_predict(args) -> int:
    from trtseg.options import settings_from_args
    opts = json.loads(args.storage_options) if args.storage_options else None
    settings = settings_from_args(args)
    _resolve_model_folder(args)
    if args.single_process:
        from trtseg import storage
        from trtseg.log import setup_logging
        from trtseg.predict import predict_folder
        setup_logging(args.log_json)
        storage.set_default_options(opts)
        report = predict_folder(args.input, args.output, _load_model(args, several=True), args.folds, args.checkpoint,
                                settings, opts, args.limit, args.dry_run, args.overwrite, args.progress,
                                allow_empty=args.allow_empty, input_identity=args.input_identity,
                                shard=args.shard)
    else:
        from trtseg.jobs.config import JobConfig
        from trtseg.jobs.driver import run_job
        card = ({"card": args.card, "network": args.network, "weights": args.weights, "onnx": args.onnx_model}
                if args.card else None)
        report = run_job(JobConfig(input=args.input, output=args.output, model=args.model, folds=args.folds,
                                   checkpoint=args.checkpoint, model_card=card, settings=settings,
                                   storage_options=opts, **{f: getattr(args, f) for f in _JOB_FLAGS}))
    if report.get("dry_run"):
        return 0
    s = report["summary"]
    print(f"{s['ok']}/{s['total']} cases ok, {s['failed']} failed, {s['skipped']} skipped, "
          f"{s['wall_seconds']} s; report: {args.output.rstrip('/')}/run_report.json")
    return 1 if s["failed"] else 0


def cmd_export(args) -> int:
    from trtseg.accel.precision import make_artefact
    from trtseg.pipeline import mask_predictor

    model = _load_model(args)
    model = model.with_folds([(args.folds or model.folds)[0]])
    report = make_artefact(model, args.output, args.precision, None if args.dynamic_batch else args.batch,
                           args.dynamic_spatial, args.calibration, args.calibration_cases, args.calibration_method,
                           args.patches, args.max_dice_drop, mask_predictor(model))
    print(json.dumps({k: report[k] for k in ("vs_pytorch_fp32", "gate") if k in report}, indent=2))
    print(f"wrote {args.output} and {args.output}.report.json")
    return 0


def cmd_build(args) -> int:
    from trtseg.accel.engines import default_cache
    from trtseg.accel.tensorrt_build import BuildSpec, EngineCache

    spec = BuildSpec(args.min_batch, args.opt_batch, args.max_batch, args.optimization_level, args.workspace_gib,
                     args.target_cc)
    cache = EngineCache(args.engine_cache or default_cache())
    engine = cache.get_or_build(args.onnx, spec, args.precision, rebuild=args.rebuild)
    print(f"engine: {len(engine)} bytes ({'built' if cache.builds else 'from cache'}) in {cache.url}")
    return 0


def cmd_compare(args) -> int:
    from trtseg.accel.compare import compare_engines, engine_from_spec
    from trtseg.accel.patches import random_patches, sample_patches

    model = _load_model(args)
    fold = (args.folds or model.folds)[0]
    from trtseg.options import EngineSpec, from_args
    device = args.device or "cpu"
    # an fp8/int8 engine calibrates on --calibration, else on -i's volumes
    base = from_args(EngineSpec, args).with_(device=device, cache=args.engine_cache)
    base = base.with_(calibration=base.calibration or args.input)
    a = engine_from_spec(args.a, model, device, args.engine_cache, fold, base)
    b = engine_from_spec(args.b, model, device, args.engine_cache, fold, base)
    patches = sample_patches(model, args.input, args.patches) if args.input else random_patches(model, args.patches)
    channels = list(range(model.labels.num_heads))  # Dice of the argmax over output channels
    report = {"a": args.a, "b": args.b, "source": args.input or "random", **compare_engines(a, b, patches, channels)}
    for name, engine in (("a", a), ("b", b)):  # an 8-bit engine's calibration and its gate on whole cases
        if getattr(engine, "calibration", None):
            report[f"calibration_{name}"] = engine.calibration
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
    # the calibration flags predict declares (EngineSpec), with export's own defaults: ONNX Runtime's minmax, four
    # report cases, and no gate unless asked for
    from trtseg.options import CALIBRATION_OPTIONS, EngineSpec, add_options
    add_options(e, EngineSpec, only=CALIBRATION_OPTIONS,
                defaults=EngineSpec(calibration_cases=4, calibration_method="minmax", max_dice_drop=None))
    e.add_argument("--patches", type=int, default=4, help="random and real patches for the ONNX Runtime comparison")
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
    c.add_argument("--a", default="torch:fp32", help="an engine spec KIND[:TOKEN+...] (torch:fp32, "
                   "onnxruntime:fp16, torch:fp16+compile+channels-last; see trtseg/options.py), or a .onnx / .engine file")
    c.add_argument("--b", required=True, help="as --a")
    c.add_argument("-i", "--input", default=None, help="folder of real volumes to cut patches from (default: random)")
    c.add_argument("--patches", type=int, default=4)
    c.add_argument("--device", default=None)
    c.add_argument("--engine-cache", default=None)
    add_options(c, EngineSpec, only=CALIBRATION_OPTIONS)
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


def entry() -> None:
    """The `trtseg` console script (and `python -m trtseg.cli`): ``main``, then, after a run in one process, the
    process ends without the interpreter's teardown (freeing torch's thousands of modules and objects one by one,
    then CUDA's context), which the operating system does at once. Warm one-CT runs spent 0.8-1.1 s between their
    last log line and the process's end, a tenth of the command, and 0.2-0.27 s without the teardown
    (benchmarks/startup_profile.py, "after_last_line", on NVIDIA H100s; h100_startup_profile_small_run.json).
    Log handlers and output streams are flushed and the atexit handlers run first; a process connected to Ray
    exits normally, so that Ray's own exit handlers disconnect it from its cluster."""
    rc = main()
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        sys.exit(rc)
    import atexit
    import logging

    logging.shutdown()
    atexit._run_exitfuncs()  # noqa: SLF001  what sys.exit would run: finalizers, storage sessions
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away, a closed stream: nothing left to keep
            pass
    os._exit(rc)


if __name__ == "__main__":
    entry()
