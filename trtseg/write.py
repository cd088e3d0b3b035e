"""Stage 7, write: the mask as NIfTI with exactly the input's geometry, written atomically.

The input's first-channel header is copied (affine, qform/sform and their codes, units), its data type set to the
mask's, scaling removed, and the voxels written as (x, y, z). gzip level 6 is nnU-Net's (zlib's default); lower
levels trade size for speed (trtseg/codec.py: igzip when installed).
"""
from __future__ import annotations

import io
import pickle
import zlib

import nibabel as nib
import numpy as np

from trtseg import codec, formats, storage


STAMP_PREFIX = b"trtseg:"


def encode_mask(mask_zyx: np.ndarray, header: nib.Nifti1Header, compress_level: int = 1, stamp: str = "") -> bytes:
    """NIfTI bytes (gzip-compressed when compress_level > 0) of a (z, y, x) mask with ``header``'s geometry.

    stamp: written into the header's descrip field as ``trtseg:<stamp>`` (at most 72 characters), so a rerun can
    tell which model and settings made an existing mask without any other file.
    """
    hdr = header.copy()
    hdr["descrip"] = (STAMP_PREFIX + stamp.encode()[:72]) if stamp else hdr["descrip"]
    hdr.set_data_dtype(mask_zyx.dtype)
    hdr.set_slope_inter(1.0, 0.0)
    cls = nib.Nifti2Image if isinstance(hdr, nib.Nifti2Header) else nib.Nifti1Image
    # the (x, y, z) view of a C-ordered (z, y, x) array is Fortran-ordered, which is NIfTI's on-disk order: nibabel
    # then writes its bytes as they are, without the two full transposed copies a C-ordered (x, y, z) array costs
    img = cls(mask_zyx.transpose(2, 1, 0), None, header=hdr)
    img.set_qform(header.get_qform(), code=int(header["qform_code"]))
    img.set_sform(header.get_sform(), code=int(header["sform_code"]))
    raw = img.to_bytes()
    return codec.compress(raw, compress_level) if compress_level > 0 else raw


def write_mask(url: str, mask_zyx: np.ndarray, header,
               storage_options: storage.StorageOptions | None = None, compress_level: int = 1, stamp: str = "") -> int:
    """Writes the mask to ``url`` atomically; returns the bytes written. ``header`` is the input's NIfTI header
    (.nii.gz or .nii, nibabel) or its ``SitkGeometry`` (.nrrd, .mha, .mhd: SimpleITK, trtseg/formats.py)."""
    if isinstance(header, formats.SitkGeometry):
        return formats.write_sitk(url, mask_zyx, header, stamp[:200], storage_options)
    data = encode_mask(mask_zyx, header, compress_level if url.endswith(".gz") else 0, stamp)
    storage.write_bytes_atomic(url, data, storage_options)
    return len(data)


def write_probabilities(url_truncated: str, probabilities: np.ndarray, properties: dict,
                        storage_options: storage.StorageOptions | None = None) -> None:
    """nnU-Net's --save_probabilities files: CASE.npz (key 'probabilities', (k, z, y, x)) and CASE.pkl."""
    buf = io.BytesIO()
    np.savez_compressed(buf, probabilities=probabilities)
    storage.write_bytes_atomic(url_truncated + ".npz", buf.getvalue(), storage_options)
    storage.write_bytes_atomic(url_truncated + ".pkl", pickle.dumps(properties), storage_options)


def read_stamp(url: str, storage_options: storage.StorageOptions | None = None) -> str | None:
    """The stamp of an existing mask (None when absent, unreadable or not made by trtseg); reads only its header."""
    if formats.ending(url) in formats.SITK_ENDINGS:
        return formats.read_sitk_stamp(url, storage_options)
    try:
        fs, path = storage.filesystem(url, storage_options)
        with fs.open(path, "rb") as f:
            head = f.read(4096)
        if head[:2] == b"\x1f\x8b":
            head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, 348)
        descrip = bytes(head[148:228]).split(b"\x00", 1)[0]
    except Exception:
        return None
    return descrip[len(STAMP_PREFIX):].decode(errors="replace") if descrip.startswith(STAMP_PREFIX) else None
