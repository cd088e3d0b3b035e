"""trtseg: nnU-Net inference that gives nnU-Net's masks, fast.

The pipeline reads in the order the data flows, one module a stage:

    read.py        NIfTI files (any fsspec URL) -> CaseImage, array (c, z, y, x) float32, spacing (z, y, x) in mm
    preprocess.py  transpose, crop to nonzero, normalize, resample to the plans' spacing (torch, GPU when present)
    resample.py    the resampling itself: nnU-Net's numerics (B-spline order 3, linear, nearest) as torch matmuls
    tile.py        padding, sliding-window tile starts and the Gaussian importance map
    infer.py       one batch of tiles through an engine, with mirroring test-time augmentation
    aggregate.py   Gaussian-weighted sum of tile logits into the full volume
    export.py      logits back to the input grid, argmax or regions, uncrop, transpose back
    write.py       the mask as NIfTI with the input's exact geometry, written atomically

model.py loads an nnU-Net v2 trained model folder; predict.py chains the stages for one case;
cli.py is the `trtseg` command. Engines live in the `accel` package, the Ray job in `jobs`.
"""

__version__ = "0.1.0"
