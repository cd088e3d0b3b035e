"""The written mask's gzip level: seconds to compress and bytes written, per level, on real-looking masks.

    python -m benchmarks.mask_gzip [--data data/demo] [--repeats 3] [--json out.json]

Masks (uint8, as trtseg writes them):
- brain tissue: background / grey matter / white matter of the MNI ICBM152 2009a atlas (probability maps > 0.5),
  real anatomy's boundaries, 197x233x189 (scripts/demo_data.sh fetches it);
- brain extraction: ch2bet's brain mask, one label, 181x217x181;
- CT: a 512x512x240 CT-like volume (trtseg.synthetic) thresholded into body, organs and bone, its noise giving
  ragged boundaries, 4 labels.

Each level runs trtseg.codec.compress (Intel ISA-L's igzip at levels 0-3 when installed, zlib above) on the NIfTI
bytes trtseg.write.encode_mask makes; figures are medians of --repeats runs. Every level decompresses to the same
voxels (checked).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import nibabel as nib
import numpy as np

from benchmarks.common import machine, save
from trtseg import codec
from trtseg import synthetic as syn
from trtseg.write import encode_mask


def masks(data: str) -> dict[str, tuple[np.ndarray, nib.Nifti1Header]]:
    out = {}
    gm = os.path.join(data, "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")
    if os.path.exists(gm):
        g = nib.load(gm)
        w = np.asarray(nib.load(gm.replace("_gm_", "_wm_")).dataobj)
        label = np.zeros(g.shape, np.uint8)
        label[np.asarray(g.dataobj) > 0.5] = 1
        label[w > 0.5] = 2
        out["brain_tissue_197x233x189"] = (label.transpose(2, 1, 0), g.header)
    bet = os.path.join(data, "ch2bet.nii.gz")
    if os.path.exists(bet):
        b = nib.load(bet)
        out["brain_extraction_181x217x181"] = ((np.asarray(b.dataobj) > 0).astype(np.uint8).transpose(2, 1, 0), b.header)
    ct = syn.ct_like_volume((512, 512, 240), seed=0)
    label = np.zeros(ct.shape, np.uint8)
    label[ct > -300] = 1  # body
    label[(ct > 60) & (ct < 400)] = 2  # organs brighter than soft tissue
    label[ct > 500] = 3  # bone
    img = nib.Nifti1Image(label, syn.affine_for((0.7, 0.7, 1.25)))
    out["ct_512x512x240"] = (label.transpose(2, 1, 0), img.header)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/demo")
    ap.add_argument("--levels", nargs="+", type=int, default=[1, 2, 3, 4, 6, 9])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    result = {"scenario": "mask_gzip", "machine": machine(), "codec": codec.backend(), "masks": {}}
    for name, (mask, header) in masks(args.data).items():
        raw = encode_mask(mask, header, 0)
        rows = {}
        for level in args.levels:
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                packed = codec.compress(raw, level)
                times.append(time.perf_counter() - t)
            assert codec.decompress(packed) == raw, level
            rows[str(level)] = {"seconds": round(statistics.median(times), 4), "bytes": len(packed),
                                "ratio": round(len(raw) / len(packed), 1)}
        result["masks"][name] = {"raw_bytes": len(raw), "labels": int(mask.max()) + 1, "levels": rows}
    save(result, args.json)


if __name__ == "__main__":
    main()
