"""Stage 1, read: NIfTI files -> CaseImage.

Axis order and spacing follow nnU-Net's default reader (SimpleITK), without reorientation: nibabel's voxel array is
(x, y, z) as stored; we transpose it to (z, y, x) and reverse the header's zooms to (z, y, x). Scaling
(scl_slope/scl_inter) is applied, as SimpleITK does. The first channel's header is kept, unchanged, so that the
written mask has exactly the input's geometry (affine, qform/sform and their codes).

Every way a file can be unusable raises CaseError naming the file and the cause, in one line.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field

import zlib

import nibabel as nib
import numpy as np

from trtseg import codec, formats, storage
from trtseg.errors import CaseError


@dataclass
class CaseImage:
    """One case as read from disk.

    data: (c, z, y, x), channels in the order of the case's files (_0000, _0001, ...): float32, or for an
        unscaled integer file (most CTs: int16) its own integer type, which preprocessing casts to float32 on the
        compute device (the same values as a cast here: half the bytes to copy, and no host pass over the volume)
    spacing_zyx: voxel size in mm along (z, y, x), positive
    header: the NIfTI header of the first channel, used to write the mask with identical geometry (for NRRD and
        MetaImage inputs a ``trtseg.formats.SitkGeometry``)
    files: the URLs the channels were read from
    """

    data: np.ndarray
    spacing_zyx: tuple[float, float, float]
    header: nib.Nifti1Header
    files: list[str] = field(default_factory=list)

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape[1:])  # type: ignore[return-value]


def _raw_header(head: bytes):
    """The NIfTI-1 or NIfTI-2 header at the start of ``head`` as written (nibabel's checks and fixes off), or None."""
    for cls in (nib.Nifti1Header, nib.Nifti2Header):
        try:
            hdr = cls.from_fileobj(io.BytesIO(head), check=False)
        except Exception:
            continue
        if int(hdr["sizeof_hdr"]) == cls.template_dtype["sizeof_hdr"].type(cls.sizeof_hdr):
            return hdr
    return None


def _check_header_fits(raw: bytes, url: str, max_bytes: int | None) -> None:
    """Refuses, before decompressing, a NIfTI whose header cannot describe the file: dimensions, vox_offset and data
    type that claim more (or other) bytes than the file holds (a gzip stream's trailer states its uncompressed size
    modulo 2^32), or a volume over ``max_bytes`` as float32 (--memory-budget-gb)."""
    gz = raw[:2] == b"\x1f\x8b"
    try:
        head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(raw[:65536], 544) if gz else raw[:544]
    except zlib.error:
        return  # a stream that does not decompress is refused by the decoder, with its cause
    hdr = _raw_header(head)
    if hdr is None:
        return  # not NIfTI: the decoder says so
    ndim = int(hdr["dim"][0])
    dims = [int(d) for d in hdr["dim"][1:1 + max(0, min(ndim, 7))]]
    if not 1 <= ndim <= 7 or any(d < 1 for d in dims):
        return  # read_channel refuses it with the shape named
    voxels = int(np.prod(dims, dtype=np.int64))
    need = int(hdr["vox_offset"]) + voxels * max(1, int(hdr["bitpix"]) // 8)
    if max_bytes is not None and voxels * 4 > max_bytes:
        raise CaseError(url, f"header claims {dims} voxels ({voxels * 4 / 2 ** 30:.1f} GiB as float32), more than "
                             f"--memory-budget-gb; refused before decompressing")
    if gz:
        stated = int.from_bytes(raw[-4:], "little")  # gzip's ISIZE: the uncompressed size modulo 2^32
        if need < 2 ** 32 and stated < need:
            raise CaseError(url, f"header claims {dims} voxels ({need} bytes), but the gzip stream holds "
                                 f"{stated} bytes (mod 2^32): truncated or not what its header says; refused "
                                 f"before decompressing")
    elif len(raw) < need:
        raise CaseError(url, f"header claims {dims} voxels ({need} bytes), but the file has {len(raw)} bytes")


def _decode(raw: bytes, url: str, max_bytes: int | None = None) -> nib.Nifti1Image:
    _check_header_fits(raw, url, max_bytes)
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = codec.decompress(raw)
        except codec.ERRORS as e:
            raise CaseError(url, f"truncated or corrupt gzip stream ({e})") from None
    if len(raw) < 348:
        raise CaseError(url, f"not a NIfTI file ({len(raw)} bytes, shorter than a NIfTI-1 header)")
    _check_raw_pixdim(raw, url)
    errors = []
    for cls in (nib.Nifti1Image, nib.Nifti2Image):
        try:
            return cls.from_bytes(raw)
        except Exception as e:  # nibabel raises several types for a header it cannot parse
            errors.append(str(e))
    raise CaseError(url, f"not a NIfTI file ({errors[0]})")


def _check_raw_pixdim(raw: bytes, url: str) -> None:
    """nibabel silently replaces zero or negative pixdim by 1 or its absolute value; such a file has no usable
    spacing, so we look at the header as written."""
    hdr = _raw_header(raw)
    if hdr is None:
        return
    ndim = int(hdr["dim"][0])
    pix = [float(v) for v in hdr["pixdim"][1:1 + min(max(ndim, 0), 3)]]
    if any(not np.isfinite(v) or v <= 0 for v in pix):
        raise CaseError(url, f"invalid voxel spacing (pixdim {pix}); spacings must be positive")


def _voxels(img: nib.Nifti1Image) -> tuple[np.ndarray, bool]:
    """The voxels (x, y, z[, c]) in the file's (Fortran) order, scaling applied, and whether they can hold NaN or
    Inf.

    An unscaled integer file (most CTs: int16) keeps its integer type: preprocessing casts it to float32 on the
    compute device, as nnU-Net casts SimpleITK's array (and several times faster than nibabel's get_fdata). Other
    files go through get_fdata as float32. Unscaled integers cannot be NaN or Inf, so only the others are checked.
    """
    slope, inter = img.header.get_slope_inter()
    if slope in (None, 1.0) and inter in (None, 0.0) and img.get_data_dtype().kind in "iu":
        raw = np.asanyarray(img.dataobj)
        if raw.dtype.kind in "iu":
            return raw, False
    return img.get_fdata(dtype=np.float32), True


def read_channel(url: str, storage_options: storage.StorageOptions | None = None, max_bytes: int | None = None
                 ) -> tuple[np.ndarray, tuple[float, float, float], nib.Nifti1Header, np.ndarray]:
    """Reads one image file. Returns (array (c, z, y, x) float32 or the file's integer type (see CaseImage),
    spacing (z, y, x), header, affine): for NIfTI (nibabel) its header, for NRRD and MetaImage (SimpleITK,
    trtseg/formats.py) a ``SitkGeometry``.

    A 4-D NIfTI file holds its channels along the 4th axis.
    """
    if formats.ending(url) in formats.SITK_ENDINGS:
        arr3, spacing, geometry = formats.read_sitk(url, storage_options)
        if arr3.dtype.kind == "f" and not np.all(np.isfinite(arr3)):
            raise CaseError(url, f"{int(arr3.size - np.count_nonzero(np.isfinite(arr3)))} voxels are NaN or Inf")
        if any(int(s) == 0 for s in arr3.shape):
            raise CaseError(url, f"image has a dimension of size 0 (shape {arr3.shape[::-1]})")
        return np.ascontiguousarray(arr3[None]), spacing, geometry, geometry.affine()  # type: ignore[return-value]
    try:
        raw = storage.read_bytes(url, storage_options)
    except FileNotFoundError:
        raise CaseError(url, "file not found") from None
    except Exception as e:
        raise CaseError(url, f"cannot read ({type(e).__name__}: {e})") from None
    img = _decode(raw, url, max_bytes)
    shape = img.shape
    if len(shape) < 3:
        raise CaseError(url, f"{len(shape)}-D image of shape {shape}; trtseg reads 3-D volumes (a 2d model runs "
                             "over a volume's slices): save it as a volume of one slice")
    if len(shape) > 4 or (len(shape) == 4 and shape[3] < 1):
        raise CaseError(url, f"{len(shape)}-D image of shape {shape}; a 3-D volume (or 4-D with channels last) is required")
    if any(int(s) == 0 for s in shape):
        raise CaseError(url, f"image has a dimension of size 0 (shape {shape})")
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    if any(not np.isfinite(z) or z <= 0 for z in zooms):
        raise CaseError(url, f"invalid voxel spacing (pixdim) {zooms}; spacings must be positive")
    try:
        arr, check_finite = _voxels(img)
    except Exception as e:
        raise CaseError(url, f"cannot decode voxel data, file truncated or corrupt ({type(e).__name__}: {e})") from None
    if check_finite and not np.all(np.isfinite(arr)):
        n_bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise CaseError(url, f"{n_bad} voxels are NaN or Inf")
    if arr.ndim == 3:
        arr = arr[..., None]
    data = np.ascontiguousarray(arr.transpose(3, 2, 1, 0))  # (x, y, z, c) -> (c, z, y, x)
    spacing = (zooms[2], zooms[1], zooms[0])
    return data, spacing, img.header, img.affine


def read_case(files: list[str], expected_channels: int | None = None,
              storage_options: storage.StorageOptions | None = None, max_bytes: int | None = None,
              series_rules: dict[str, str] | None = None) -> CaseImage:
    """Reads the channel files of one case and checks that they agree in shape and geometry.

    files: one URL per channel (nnU-Net's CASE_0000, CASE_0001, ...), or one 4-D file with channels last
    expected_channels: the model's input channel count, checked when given
    max_bytes: a volume whose header claims more float32 bytes is refused before it is decompressed
    series_rules: which series of a DICOM study folder to read (InputOptions.given()); the image's ``files`` are
        then that series' files
    """
    if files and files[0].lower().endswith(".dcm"):  # a DICOM series (trtseg/dicom.py): one channel
        from trtseg import dicom
        where = files[0].rsplit("/", 1)[0]
        if expected_channels not in (None, 1):
            raise CaseError(where, f"a DICOM series is one channel, the model expects {expected_channels}")
        arr, spacing, header, chosen = dicom.read_series(list(files), where, series_rules)
        return CaseImage(data=np.ascontiguousarray(arr[None]), spacing_zyx=spacing, header=header, files=chosen)
    arrays, spacing0, header0, affine0 = [], None, None, None
    for url in files:
        data, spacing, header, affine = read_channel(url, storage_options, max_bytes)
        if header0 is None:
            spacing0, header0, affine0 = spacing, header, affine
        else:
            if data.shape[1:] != arrays[0].shape[1:]:
                raise CaseError(url, f"shape {data.shape[1:][::-1]} differs from {files[0]}'s {arrays[0].shape[1:][::-1]} (x, y, z)")
            if not np.allclose(affine, affine0, rtol=1e-5, atol=1e-4):
                raise CaseError(url, f"affine differs from {files[0]}'s; channel files must share one geometry")
        arrays.append(data)
    data = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
    if expected_channels is not None and data.shape[0] != expected_channels:
        raise CaseError(files[0], f"case has {data.shape[0]} channel(s), the model expects {expected_channels}")
    assert spacing0 is not None and header0 is not None
    return CaseImage(data=data, spacing_zyx=spacing0, header=header0, files=list(files))
