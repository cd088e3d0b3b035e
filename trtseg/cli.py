"""The `trtseg` command, in nnU-Net's habits.

    trtseg predict -i INPUT -o OUTPUT -m MODEL_FOLDER [-f 0 1 ...] [--step-size 0.5] [--disable-tta]
                   [--device cpu|cuda] [--save-probabilities] [--checkpoint checkpoint_final.pth]
    trtseg demo [--output out/demo]
"""
from __future__ import annotations

import argparse
import json
import sys

from trtseg.errors import TrtsegError


def _add_predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-i", "--input", required=True, help="folder (or file) of NIfTI images; any fsspec URL")
    p.add_argument("-o", "--output", required=True, help="output folder; any fsspec URL")
    p.add_argument("-m", "--model", required=True, help="nnU-Net v2 trained model folder (dataset.json, plans.json, fold_N/)")
    p.add_argument("-f", "--folds", nargs="+", default=None, help="folds to ensemble (default: every fold found)")
    p.add_argument("--checkpoint", default="checkpoint_final.pth", help="checkpoint file name in each fold folder")
    p.add_argument("--step-size", type=float, default=0.5, help="tile step as a fraction of the patch size")
    p.add_argument("--disable-tta", action="store_true", help="no mirroring test-time augmentation")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--precision", default=None, choices=["fp32", "fp16", "bf16"], help="engine precision (CUDA default fp16)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (CUDA)")
    p.add_argument("--batch-size", type=int, default=2, help="tiles per engine call")
    p.add_argument("--save-probabilities", action="store_true", help="also write CASE.npz/CASE.pkl as nnU-Net does")
    p.add_argument("--storage-options", default=None, help="JSON of fsspec storage options (credentials stay out of reports)")
    p.add_argument("--compress-level", type=int, default=6, help="gzip level of written masks (1 fastest, 9 smallest)")
    p.add_argument("--limit", type=int, default=None, help="process at most N cases")
    p.add_argument("--dry-run", action="store_true", help="list the cases that would run and stop")


def _settings(args):
    from trtseg.predict import Settings
    return Settings(step_size=args.step_size, use_mirroring=not args.disable_tta, device=args.device,
                    batch_size=args.batch_size, precision=args.precision, compile=args.compile,
                    save_probabilities=args.save_probabilities, compresslevel=args.compress_level)


def cmd_predict(args) -> int:
    from trtseg.predict import predict_folder
    opts = json.loads(args.storage_options) if args.storage_options else None
    report = predict_folder(args.input, args.output, args.model, args.folds, args.checkpoint, _settings(args),
                            opts, args.limit, args.dry_run)
    if report.get("dry_run"):
        return 0
    s = report["summary"]
    print(f"{s['ok']}/{s['total']} cases ok, {s['failed']} failed, {s['wall_seconds']} s; report: "
          f"{args.output.rstrip('/')}/run_report.json")
    return 1 if s["failed"] else 0


def cmd_demo(args) -> int:
    """Generates a small nnU-Net model folder and CT-like volumes, then runs `trtseg predict` on them."""
    import os
    from trtseg import synthetic as syn
    root = args.output.rstrip("/")
    model = syn.make_model_folder(os.path.join(root, "model"), folds=(0,), patch_size=(32, 48, 48),
                                  spacing=(2.5, 1.0, 1.0), features=(8, 16, 32, 64))
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    for i, shape in enumerate([(96, 96, 40), (80, 72, 33)]):
        syn.save_nifti(os.path.join(root, "images", f"demo{i}_0000.nii.gz"), syn.ct_like_volume(shape, seed=i),
                       syn.affine_for((0.9, 0.9, 2.5), oblique_deg=10 * i))
    print(f"generated model {model} and 2 CT-like volumes in {root}/images (random weights: masks show the "
          "pipeline, not anatomy)")
    ns = argparse.Namespace(**{**vars(args), "input": os.path.join(root, "images"), "output": os.path.join(root, "masks"),
                               "model": model})
    return cmd_predict(ns)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trtseg", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="segment every case of a folder with an nnU-Net v2 model")
    _add_predict_args(p)
    p.set_defaults(func=cmd_predict)
    d = sub.add_parser("demo", help="generate a model and volumes, then predict them")
    d.add_argument("--output", default="out/demo")
    d.add_argument("--device", default=None)
    d.set_defaults(func=cmd_demo, folds=None, checkpoint="checkpoint_final.pth", step_size=0.5, disable_tta=False,
                   precision=None, compile=False, batch_size=2, save_probabilities=False, storage_options=None,
                   compress_level=6, limit=None, dry_run=False)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except TrtsegError as e:
        print(f"trtseg: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"trtseg: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
