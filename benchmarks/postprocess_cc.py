"""nnU-Net's connected-component postprocessing on a CT-sized mask: cc3d against scipy.ndimage.label.

    python -m benchmarks.postprocess_cc [--shape 512 512 240] [--repeats 3] [--json F]

The mask: a CT-like volume (trtseg.synthetic.ct_like_volume, x y z) thresholded into four labels, so that each
label has thousands of components, as a network's speckled false positives give. Timed per library: labelling
alone at 26 and 6 neighbours, and a postprocessing.pkl-style Postprocessing of three steps (the foreground, label
1, and the region {2, 3}) applied to the mask. The masks of both libraries are compared voxel for voxel.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from benchmarks.common import machine, save
from trtseg import postprocess
from trtseg import synthetic as syn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", nargs=3, type=int, default=[512, 512, 240], help="x y z")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    hu = syn.ct_like_volume(args.shape, seed=1).transpose(2, 1, 0)  # (z, y, x)
    mask = np.digitize(hu, [60.0, 150.0, 400.0]).astype(np.uint8)  # labels 0..3
    steps = (postprocess.Step(targets=(1, 2, 3), full_connectivity=True),
             postprocess.Step(targets=(1,), full_connectivity=True),
             postprocess.Step(targets=((2, 3),), full_connectivity=True))
    pp = postprocess.Postprocessing(steps=steps, source="benchmark", kind="nnunetv2", labels=(1, 2, 3))
    out: dict = {"scenario": "postprocess_cc", "machine": machine(), "shape_xyz": args.shape,
                 "labels": {int(v): int((mask == v).sum()) for v in range(4)}, "libraries": {}}
    masks = {}
    for library in ("cc3d", "scipy"):
        entry: dict = {}
        for name, full in (("label_26", True), ("label_6", False)):
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                ids, sizes = postprocess._label(mask > 0, full, library)
                times.append(time.perf_counter() - t)
            entry[name] = {"seconds": round(statistics.median(times), 3), "components": int(len(sizes) - 1)}
        blocked = sys.modules.get("cc3d")
        if library == "scipy":  # the product's own fallback: cc3d that does not import
            sys.modules["cc3d"] = None  # type: ignore[assignment]
        try:
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                masks[library], removed = pp.apply(mask)
                times.append(time.perf_counter() - t)
        finally:
            if blocked is not None:
                sys.modules["cc3d"] = blocked
        entry["apply_three_steps"] = {"seconds": round(statistics.median(times), 3), "voxels_removed": removed}
        out["libraries"][library] = entry
    out["masks_equal"] = bool(np.array_equal(masks["cc3d"], masks["scipy"]))
    save(out, args.json)


if __name__ == "__main__":
    main()
