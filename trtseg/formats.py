"""Image formats beside NIfTI: NRRD (.nrrd), MetaImage (.mha, and .mhd with its .raw/.zraw data file), read and
written with SimpleITK, nnU-Net's own reader (SimpleITKIO), so that arrays, spacing, origin and direction are
exactly what nnU-Net sees. NIfTI keeps nibabel's faster path (trtseg/read.py, trtseg/write.py).

SimpleITK reads and writes only files, so objects on other stores go through a temporary local copy. Its array is
(z, y, x) with spacing, origin and direction in (x, y, z) physical order, as nnU-Net uses them.
"""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass

import numpy as np

from trtseg import storage
from trtseg.errors import CaseError

NIFTI_ENDINGS = (".nii.gz", ".nii")
SITK_ENDINGS = (".nrrd", ".mha", ".mhd")
ENDINGS = NIFTI_ENDINGS + SITK_ENDINGS
STAMP_KEY = "trtseg_stamp"


def ending(name: str) -> str | None:
    """The image ending of a file name (".nii.gz", ".nrrd", ...), or None for another file."""
    low = name.lower()
    return next((e for e in ENDINGS if low.endswith(e)), None)


@dataclass(frozen=True)
class SitkGeometry:
    """What a mask needs of a SimpleITK-read input to be written with the same geometry: spacing, origin and the
    direction cosines (row-major 3x3), all in SimpleITK's (x, y, z) order, and the file ending."""

    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    ending: str

    def affine(self) -> np.ndarray:
        """A 4x4 voxel-to-physical matrix (x, y, z), to check that channel files share one geometry."""
        a = np.eye(4)
        a[:3, :3] = np.asarray(self.direction).reshape(3, 3) @ np.diag(self.spacing)
        a[:3, 3] = self.origin
        return a


def _local_copy(url: str, tmp: str, storage_options) -> str:
    """A local path for ``url``: the path itself on a local disk, else a copy in ``tmp`` (with an .mhd's data
    file beside it)."""
    fs, path = storage.filesystem(url, storage_options)
    if storage._local(fs):
        return path
    name = os.path.join(tmp, path.rsplit("/", 1)[-1])
    with open(name, "wb") as f:
        f.write(storage.read_bytes(url, storage_options))
    if name.lower().endswith(".mhd"):
        text = open(name, "rb").read(65536).decode("latin-1")
        m = re.search(r"^ElementDataFile\s*=\s*(\S+)", text, re.MULTILINE)
        if m and m.group(1) != "LOCAL":
            data_url = url.rsplit("/", 1)[0] + "/" + m.group(1)
            with open(os.path.join(tmp, m.group(1)), "wb") as f:
                f.write(storage.read_bytes(data_url, storage_options))
    return name


def read_sitk(url: str, storage_options=None) -> tuple[np.ndarray, tuple[float, float, float], SitkGeometry]:
    """(voxels (z, y, x) in the file's type (float types as float32), spacing (z, y, x), geometry)."""
    import SimpleITK as sitk

    with tempfile.TemporaryDirectory(prefix="trtseg_read_") as tmp:
        try:
            path = _local_copy(url, tmp, storage_options)
        except FileNotFoundError:
            raise CaseError(url, "file not found") from None
        try:
            img = sitk.ReadImage(path)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise CaseError(url, f"SimpleITK cannot read it ({first[:200]})") from None
    if img.GetDimension() != 3:
        raise CaseError(url, f"{img.GetDimension()}-D image; trtseg reads 3-D volumes (a 2d model runs over a "
                             "volume's slices): save it as a volume of one slice")
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise CaseError(url, f"{img.GetNumberOfComponentsPerPixel()} components per voxel; give one file per channel "
                             "(CASE_0000, CASE_0001, ...)")
    arr = sitk.GetArrayFromImage(img)
    if arr.dtype.kind == "f":
        arr = arr.astype(np.float32, copy=False)
    spacing = tuple(float(s) for s in img.GetSpacing())
    if any(not np.isfinite(s) or s <= 0 for s in spacing):
        raise CaseError(url, f"invalid voxel spacing {list(spacing)}; spacings must be positive")
    geometry = SitkGeometry(spacing, tuple(float(o) for o in img.GetOrigin()),
                            tuple(float(d) for d in img.GetDirection()), ending(url) or ".nrrd")
    return arr, (spacing[2], spacing[1], spacing[0]), geometry


def write_sitk(url: str, mask_zyx: np.ndarray, geometry: SitkGeometry, stamp: str = "",
               storage_options=None) -> int:
    """Writes a (z, y, x) mask with the input's geometry in the format of ``url``'s ending, compressed as nnU-Net's
    SimpleITKIO writes it, and the stamp as the metadata field ``trtseg_stamp``. Each file is written atomically;
    an .mhd's data file goes first, so its header never names a missing file. Returns the bytes written."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(mask_zyx)
    img.SetSpacing(geometry.spacing)
    img.SetOrigin(geometry.origin)
    img.SetDirection(geometry.direction)
    if stamp:
        img.SetMetaData(STAMP_KEY, stamp)
    base = url.rsplit("/", 1)[-1]
    with tempfile.TemporaryDirectory(prefix="trtseg_write_") as tmp:
        local = os.path.join(tmp, base)
        sitk.WriteImage(img, local, True)
        written = 0
        for name in sorted(os.listdir(tmp), key=lambda n: n == base):  # the header (named file) last
            data = open(os.path.join(tmp, name), "rb").read()
            storage.write_bytes_atomic(url.rsplit("/", 1)[0] + "/" + name if "/" in url else name, data,
                                       storage_options)
            written += len(data)
    return written


def read_sitk_stamp(url: str, storage_options=None) -> str | None:
    """The stamp of an existing NRRD/MetaImage mask, from its text header only (None when absent)."""
    try:
        fs, path = storage.filesystem(url, storage_options)
        with fs.open(path, "rb") as f:
            head = f.read(65536).decode("latin-1")
    except Exception:
        return None
    m = re.search(rf"^{STAMP_KEY}\s*(?::=|=)\s*(.*?)\s*$", head, re.MULTILINE)
    return m.group(1) if m else None
