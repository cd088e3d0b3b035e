"""Stage 6b, postprocess: nnU-Net's connected-component postprocessing of a finished mask (z, y, x), for v2's
postprocessing.pkl and v1's postprocessing.json, with one component core.

- nnU-Net v2 (``nnUNetv2_apply_postprocessing``): each step keeps only the largest connected component of a union
  of labels or regions (full connectivity: 26 neighbours in 3-D, skimage.measure.label's default); removed voxels
  become background. Every component of the largest size is kept.
- nnU-Net v1 (``predict_cases``, on by default): per class or class group, every component but the largest is
  removed (face connectivity: 6 neighbours, scipy.ndimage.label's default), unless ``min_valid_object_size`` keeps
  components at least that large (in mm^3, the voxel volume from the input's spacing).

Components are labelled with connected-components-3d (cc3d), and with scipy.ndimage.label where cc3d does not
import; both give the same components and masks. On a 512x512x240 CT-like mask with 53,211 components (26
neighbours) on 2 CPU cores, cc3d labels in 0.57 s against scipy's 1.20 s, and three postprocessing.pkl steps take
2.19 s against 4.70 s (python -m benchmarks.postprocess_cc, benchmarks/results/cpu2core_postprocess_cc.json).
"""
from __future__ import annotations

import ast
import io
import json
import pickle
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trtseg import storage
from trtseg.errors import TrtsegError

def _label(mask: np.ndarray, full_connectivity: bool, library: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(component ids of ``mask`` (2-D or 3-D bool), voxel count per id with index 0 the background).

    library: "cc3d" or "scipy"; None takes cc3d where it imports (see the module docstring)."""
    if library in (None, "cc3d"):
        try:
            import cc3d
        except ImportError:
            if library == "cc3d":
                raise
        else:
            neighbours = {2: (8, 4), 3: (26, 6)}[mask.ndim][0 if full_connectivity else 1]
            ids = cc3d.connected_components(np.ascontiguousarray(mask),
                                            connectivity=neighbours)  # type: ignore[call-overload]
            return ids, np.bincount(ids.ravel())
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim if full_connectivity else 1)
    ids, _ = ndimage.label(mask, structure=structure)
    return ids, np.bincount(ids.ravel())


def largest_components(mask: np.ndarray, full_connectivity: bool, keep_min_size: float | None = None,
                       voxel_volume: float = 1.0) -> np.ndarray:
    """The voxels of ``mask`` (bool) in its largest component(s) (every one of the largest size), and in any other
    component of at least ``keep_min_size`` (voxel_volume units per voxel; None keeps no other)."""
    ids, sizes = _label(mask, full_connectivity)
    if len(sizes) <= 1:
        return mask.copy()
    volumes = sizes[1:] * voxel_volume
    keep = volumes == volumes.max()
    if keep_min_size is not None:
        keep |= volumes >= keep_min_size
    if keep.sum() == 1:  # one component kept (the usual case): a comparison, ten times a lookup table's speed
        return ids == int(np.argmax(keep)) + 1
    return np.concatenate([[False], keep])[ids]


def _member(mask_zyx: np.ndarray, labels) -> np.ndarray:
    """Voxels whose label is ``labels`` (an int) or one of them (a region: a tuple or list of ints)."""
    if isinstance(labels, (tuple, list)):  # a few labels: comparisons, faster than np.isin's sort
        return np.logical_or.reduce([mask_zyx == v for v in labels]) if labels else np.zeros(mask_zyx.shape, bool)
    return mask_zyx == labels


@dataclass(frozen=True)
class Step:
    """One step: keep the largest component of the union of ``targets`` (labels, or regions as tuples), the rest to
    ``background``. v1 steps take one target each, face connectivity and an optional minimum size kept."""

    targets: tuple
    full_connectivity: bool = True
    background: int = 0
    keep_min_size: float | None = None


@dataclass(frozen=True)
class Postprocessing:
    """The steps nnU-Net's postprocessing file names, applied in order; ``source`` is the file."""

    steps: tuple[Step, ...] = ()
    source: str | None = None
    kind: str = "none"  # "nnunetv2", "nnunetv1" or "none"
    labels: tuple[int, ...] = field(default=())  # every label the steps name

    def apply(self, mask_zyx: np.ndarray, spacing_zyx=(1.0, 1.0, 1.0)) -> tuple[np.ndarray, int]:
        """(the postprocessed mask (a copy when anything changed), voxels set to background)."""
        removed = 0
        voxel_volume = float(np.prod(spacing_zyx))
        for step in self.steps:
            union = np.zeros(mask_zyx.shape, dtype=bool)
            for t in step.targets:
                union |= _member(mask_zyx, t)
            keep = largest_components(union, step.full_connectivity, step.keep_min_size, voxel_volume)
            drop = union & ~keep
            n = int(drop.sum())
            if n:
                mask_zyx = mask_zyx.copy()
                mask_zyx[drop] = step.background
                removed += n
        return mask_zyx, removed

    def describe(self) -> dict:
        return {"kind": self.kind, "source": self.source, "steps": [
            {"targets": [list(t) if isinstance(t, tuple) else t for t in s.targets],
             "connectivity": 26 if s.full_connectivity else 6, "keep_min_size": s.keep_min_size} for s in self.steps]}

    def check_labels(self, known: set[int], where: str) -> None:
        """Refuses a file that names labels the model does not have."""
        unknown = sorted(set(self.labels) - set(known))
        if unknown:
            raise TrtsegError(f"{where}: postprocessing names label(s) {unknown}, which the model does not predict "
                              f"(its labels: {sorted(known)})")


NONE = Postprocessing()


def _flat_labels(targets) -> tuple[int, ...]:
    out: list[int] = []
    for t in targets:
        out += [int(v) for v in t] if isinstance(t, (tuple, list)) else [int(t)]
    return tuple(out)


class _NnUNetPickle(pickle.Unpickler):
    """Reads nnU-Net v2's postprocessing.pkl without nnU-Net: its function references become names, nothing else
    may be loaded (a pickle can otherwise run any code)."""

    FUNCTIONS = {"remove_all_but_largest_component_from_segmentation"}

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("nnunetv2.") and name in self.FUNCTIONS:
            return name
        raise pickle.UnpicklingError(f"{module}.{name} is not a postprocessing function trtseg knows")


def load_v2(url: str, storage_options=None) -> Postprocessing:
    """nnU-Net v2's postprocessing.pkl ``(pp_fns, pp_fn_kwargs)`` as nnUNetv2_find_best_configuration writes it."""
    try:
        fns, kwargs = _NnUNetPickle(io.BytesIO(storage.read_bytes(url, storage_options))).load()
    except FileNotFoundError:
        raise TrtsegError(f"{url}: postprocessing file not found") from None
    except Exception as e:
        raise TrtsegError(f"{url}: not an nnU-Net postprocessing.pkl ({e})") from None
    steps = []
    for fn, kw in zip(fns, kwargs):
        if fn not in _NnUNetPickle.FUNCTIONS:
            raise TrtsegError(f"{url}: unknown postprocessing function {fn!r}")
        targets = kw["labels_or_regions"]
        targets = targets if isinstance(targets, list) else [targets]
        steps.append(Step(tuple(tuple(t) if isinstance(t, (list, tuple)) else int(t) for t in targets),
                          full_connectivity=True, background=int(kw.get("background_label", 0))))
    labels = _flat_labels([t for s in steps for t in s.targets])
    return Postprocessing(tuple(steps), url, "nnunetv2", labels)


def load_v1(url: str, storage_options=None) -> Postprocessing:
    """nnU-Net v1's postprocessing.json (``for_which_classes``, ``min_valid_object_sizes``), as its
    predict_cases applies it: each class or class group on its own, in order."""
    try:
        d = json.loads(storage.read_bytes(url, storage_options))
        classes = d["for_which_classes"]
        sizes = ast.literal_eval(d["min_valid_object_sizes"]) if d.get("min_valid_object_sizes") else None
    except FileNotFoundError:
        raise TrtsegError(f"{url}: postprocessing file not found") from None
    except Exception as e:
        raise TrtsegError(f"{url}: not an nnU-Net v1 postprocessing.json ({e})") from None
    steps = []
    for c in classes:
        key = tuple(c) if isinstance(c, (list, tuple)) else int(c)
        min_size = None if sizes is None else sizes.get(key)
        steps.append(Step((key,), full_connectivity=False, keep_min_size=min_size))
    return Postprocessing(tuple(steps), url, "nnunetv1", _flat_labels([s.targets[0] for s in steps]))


def load(url: str, storage_options=None) -> Postprocessing:
    """A postprocessing file by its ending: .pkl (nnU-Net v2) or .json (v1)."""
    if url.endswith(".json"):
        return load_v1(url, storage_options)
    return load_v2(url, storage_options)
