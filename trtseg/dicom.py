"""DICOM series as cases: a folder of one series' slice files (or one multi-frame file) is a case.

Reading: SimpleITK's series reader (ITK over GDCM), the reader nnU-Net users' DICOM-to-NIfTI conversions use. Its
geometry (spacing, origin, direction, the slice order along the normal) and intensities (rescale slope and
intercept applied) are the NIfTI route's exactly, so trtseg's masks of a series equal those of the series converted
to NIfTI with SimpleITK. GDCM decodes the common compressed transfer syntaxes (JPEG, JPEG-LS, JPEG 2000, RLE).

Checks, before any pixel is decoded, on the headers alone (pydicom, stop_before_pixels): one series per folder
(or the one that --series-modality / --series-description / --series-uid pick in a study folder), image objects
only (no SR, PR, SEG, RTSTRUCT...), one orientation, no duplicated or missing slice, uniform slice spacing and no
gantry tilt (slices stepping along their normal). A multi-frame (enhanced) object's frames are checked the same
way from its per-frame functional groups, and must stand in order in the file, since GDCM stacks them in that
order. Each refusal is one line naming the series.

The mask is written as NIfTI (CASE.nii.gz) with the series' geometry, as SimpleITK writes the converted volume.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import tempfile

import numpy as np

from trtseg import storage
from trtseg.errors import CaseError
from trtseg.options import InputOptions

#: objects that are not images a network can segment
NON_IMAGE_MODALITIES = {"SR", "PR", "KO", "SEG", "RTSTRUCT", "RTPLAN", "RTRECORD", "REG", "DOC"}
_DICOM_FILE = re.compile(r".*\.dcm$", re.IGNORECASE)


def pydicom():
    """pydicom, imported lazily. A python-gdcm that fails on import with something other than ImportError (some
    builds on some Pythons) would stop pydicom's own import at its GDCM plugin: pydicom is then imported without
    that plugin (SimpleITK brings its own GDCM for the pixels)."""
    try:
        import pydicom as module
    except AttributeError:
        for name in [n for n in sys.modules if n == "pydicom" or n.startswith("pydicom.")]:
            del sys.modules[name]
        sys.modules["gdcm"] = None  # type: ignore[assignment]
        import pydicom as module
    return module


def is_series_listing(names: list[str]) -> bool:
    """Whether a folder's file names are a DICOM series: .dcm files."""
    return any(_DICOM_FILE.match(n) for n in names)


def series_files(names: list[str]) -> list[str]:
    return sorted(n for n in names if _DICOM_FILE.match(n))


def _local_files(urls: list[str], tmp: str) -> list[str]:
    fs, _ = storage.filesystem(urls[0])
    if storage._local(fs):
        return [storage.filesystem(u)[1] for u in urls]
    out = []
    for i, u in enumerate(urls):
        path = os.path.join(tmp, f"{i:06d}.dcm")
        with open(path, "wb") as f:
            f.write(storage.read_bytes(u))
        out.append(path)
    return out


#: InputOptions' field -> its flag, from the one declaration (trtseg/options.py)
_RULE_FLAGS = {f.name: f.metadata["flag"] for f in dataclasses.fields(InputOptions)}


def _series_matches(head, rules: dict[str, str]) -> bool:
    if "series_modality" in rules and str(getattr(head, "Modality", "")).upper() != rules["series_modality"].upper():
        return False
    if "series_description" in rules and not re.search(rules["series_description"],
                                                        str(getattr(head, "SeriesDescription", "")), re.IGNORECASE):
        return False
    return "series_uid" not in rules or str(getattr(head, "SeriesInstanceUID", "")) == rules["series_uid"].strip()


def _describe(head, count: int) -> str:
    return (f"{getattr(head, 'Modality', '?')} {str(getattr(head, 'SeriesDescription', '')) or '(no description)'!r} "
            f"({count} file{'s' if count > 1 else ''}, ...{str(getattr(head, 'SeriesInstanceUID', ''))[-12:]})")


def select_series(paths: list[str], heads: list, rules: dict[str, str], where: str) -> list[int]:
    """The indices of the files of the one series that ``rules`` (InputOptions.given(): modality, a
    SeriesDescription regular expression, a SeriesInstanceUID) pick among a study folder's series; every file's
    when no rule is given (check_series then refuses a folder of several series). One-line CaseError naming the
    folder and the series found when no series, or more than one, matches."""
    if not rules:
        return list(range(len(paths)))
    groups: dict[str, list[int]] = {}
    for i, h in enumerate(heads):
        groups.setdefault(str(getattr(h, "SeriesInstanceUID", "")), []).append(i)
    found = {uid: _describe(heads[idx[0]], len(idx)) for uid, idx in groups.items()}
    chosen = [uid for uid, idx in groups.items() if _series_matches(heads[idx[0]], rules)]
    rule = " ".join(f"{_RULE_FLAGS[k]} {v}" for k, v in rules.items())
    if len(chosen) != 1:
        what = "no series matches" if not chosen else f"{len(chosen)} series match"
        listed = "; ".join(found[u] for u in (chosen or list(found))[:4])
        raise CaseError(where, f"{what} {rule}: {listed}{'; ...' if len(chosen or found) > 4 else ''}"
                               f"{'; narrow the rule (--series-uid picks one)' if chosen else ''}")
    return groups[chosen[0]]


def check_series(paths: list[str], where: str, rules: dict[str, str] | None = None) -> list[int]:
    """The header checks of the module docstring, on the series that ``rules`` pick (select_series) among the
    files; raises CaseError naming the series (``where``). Returns the indices of the files of that series."""
    pd = pydicom()
    heads = []
    for p in paths:
        try:
            heads.append(pd.dcmread(p, stop_before_pixels=True))
        except Exception as e:
            raise CaseError(p, f"not a readable DICOM file ({type(e).__name__}: {str(e)[:120]})") from None
    keep = select_series(paths, heads, rules or {}, where)
    paths, heads = [paths[i] for i in keep], [heads[i] for i in keep]
    _check_one_series(paths, heads, where)
    return keep


def _check_one_series(paths: list[str], heads: list, where: str) -> None:
    """check_series' checks of one folder's (or one chosen series') files, in the order a user fixes them."""
    uids = sorted({str(getattr(h, "SeriesInstanceUID", "")) for h in heads})
    if len(uids) > 1:
        raise CaseError(where, f"mixed series in one folder: {len(uids)} SeriesInstanceUIDs ({', '.join(u[-12:] for u in uids[:3])}"
                               f"{', ...' if len(uids) > 3 else ''}); give each series its own folder, or pick one "
                               f"with {', '.join(list(_RULE_FLAGS.values())[:-1])} or "
                               f"{list(_RULE_FLAGS.values())[-1]}")
    modalities = sorted({str(getattr(h, "Modality", "")) for h in heads} & NON_IMAGE_MODALITIES)
    if modalities or any("Rows" not in h for h in heads):
        raise CaseError(where, f"holds non-image DICOM objects ({', '.join(modalities) or 'no pixel data'}); a case "
                               "folder holds one image series")
    names, orients, pos, in_file_order = _slices(paths, heads)
    if len(names) < 2:
        return  # one slice, or a multi-frame object without per-frame positions: nothing to order or space
    if len(orients) != 1 or not next(iter(orients)):
        raise CaseError(where, "slices with different or missing ImageOrientationPatient")
    o = np.array(next(iter(orients)), dtype=float)
    normal = np.cross(o[:3], o[3:])
    normal /= np.linalg.norm(normal)
    along = pos @ normal
    order = np.argsort(along, kind="stable")
    if in_file_order and not (np.all(np.diff(along) > 0) or np.all(np.diff(along) < 0)) and \
            len(np.unique(np.round(along, 3))) == len(along):
        # GDCM stacks a multi-frame object's frames in the file's order, and takes the geometry from the first
        raise CaseError(where, "multi-frame object whose frames are not in order along their normal")
    steps = np.diff(along[order])
    names = [names[i] for i in order]
    dup = np.nonzero(steps < 1e-3)[0]
    if dup.size:
        i = int(dup[0])
        raise CaseError(where, f"duplicated slice position {along[order][i]:.3f} mm ({names[i]} and {names[i + 1]})")
    spacing = float(np.median(steps))
    gaps = np.nonzero(steps > 1.5 * spacing)[0]
    if gaps.size:
        i = int(gaps[0])
        raise CaseError(where, f"missing slice(s): a {steps[i]:.3f} mm gap between {names[i]} and {names[i + 1]} "
                               f"(slice spacing {spacing:.3f} mm)")
    if float(np.max(np.abs(steps - spacing))) > max(0.01 * spacing, 1e-3):
        raise CaseError(where, f"non-uniform slice spacing ({steps.min():.3f} to {steps.max():.3f} mm); resample "
                               "the series to uniform slices first")
    step = pos[order[-1]] - pos[order[0]]
    tilt = math.degrees(math.acos(min(1.0, abs(float(step @ normal)) / float(np.linalg.norm(step)))))
    if tilt > 0.05:
        raise CaseError(where, f"gantry tilt: slices step {tilt:.2f} degrees off their normal; resample the series "
                               "to an untilted grid first")


def _slices(paths: list[str], heads: list) -> tuple[list[str], set[tuple], np.ndarray, bool]:
    """(names, the set of ImageOrientationPatient values rounded, positions (n, 3) LPS mm, whether the order is
    the file's frame order) of the series' slices: one per file, or one per frame of a multi-frame (enhanced)
    object, read from its shared and per-frame functional groups."""
    def orient(group) -> tuple:
        return tuple(round(float(v), 4) for v in group.PlaneOrientationSequence[0].ImageOrientationPatient)

    if len(heads) == 1 and "PerFrameFunctionalGroupsSequence" in heads[0]:
        h = heads[0]
        shared = h.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in h else None
        frames = list(h.PerFrameFunctionalGroupsSequence)
        try:
            orients = {orient(f) if "PlaneOrientationSequence" in f else orient(shared) for f in frames}
            pos = np.array([[float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient] for f in frames])
        except (AttributeError, IndexError, TypeError):
            return [], set(), np.zeros((0, 3)), True
        base = os.path.basename(paths[0])
        return [f"{base} frame {i + 1}" for i in range(len(frames))], orients, pos, True
    if len(heads) == 1:
        return [], set(), np.zeros((0, 3)), False
    orients = {tuple(round(float(v), 4) for v in getattr(h, "ImageOrientationPatient", ())) for h in heads}
    pos = np.array([[float(v) for v in h.ImagePositionPatient] for h in heads])
    return [os.path.basename(p) for p in paths], orients, pos, False


def read_series(urls: list[str], where: str, rules: dict[str, str] | None = None):
    """(voxels (z, y, x) as SimpleITK's series reader gives them, spacing (z, y, x), its NIfTI header, the URLs of
    the series read: those ``rules`` pick in a study folder, see select_series)."""
    import SimpleITK as sitk

    with tempfile.TemporaryDirectory(prefix="trtseg_dicom_") as tmp:
        paths = _local_files(urls, tmp)
        keep = check_series(paths, where, rules)
        if len(keep) < len(paths):  # a study folder: GDCM orders the chosen series in a folder of its own
            os.makedirs(os.path.join(tmp, "series"))
            chosen = [os.path.join(tmp, "series", f"{k:06d}.dcm") for k in range(len(keep))]
            for i, link in zip(keep, chosen):
                os.symlink(os.path.abspath(paths[i]), link)
            urls, paths = [urls[i] for i in keep], chosen
        folder = os.path.dirname(paths[0])
        try:
            if len(paths) == 1:
                img = sitk.ReadImage(paths[0])
            else:
                reader = sitk.ImageSeriesReader()
                uids = reader.GetGDCMSeriesIDs(folder)
                names = reader.GetGDCMSeriesFileNames(folder, uids[0]) if len(uids) == 1 else paths
                reader.SetFileNames([n for n in names if n in set(paths)] or paths)
                img = reader.Execute()
        except RuntimeError as e:
            syntax = _transfer_syntax(paths[0])
            last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise CaseError(where, f"SimpleITK/GDCM cannot decode the series (transfer syntax {syntax}): "
                                   f"{last[:160]}") from None
    if img.GetDimension() != 3:
        raise CaseError(where, f"a {img.GetDimension()}-D image; trtseg reads 3-D series")
    arr = sitk.GetArrayFromImage(img)
    if arr.dtype.kind == "f":
        arr = arr.astype(np.float32, copy=False)
    spacing = tuple(float(s) for s in img.GetSpacing())
    return arr, (spacing[2], spacing[1], spacing[0]), nifti_header(arr.shape, img), urls


def _transfer_syntax(path: str) -> str:
    try:
        ts = pydicom().dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        return f"{ts.name} ({ts})"
    except Exception:
        return "unknown"


def nifti_header(shape_zyx, img):
    """The NIfTI header SimpleITK's writer gives the series: the affine from its LPS geometry turned to RAS, as
    qform and sform (code 1), so the mask has the NIfTI route's geometry."""
    import nibabel as nib

    direction = np.array(img.GetDirection(), dtype=float).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(img.GetSpacing())
    affine[:3, 3] = img.GetOrigin()
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # LPS -> RAS
    header = nib.Nifti1Header()
    header.set_data_shape(tuple(int(s) for s in shape_zyx[::-1]))
    header.set_zooms(tuple(float(s) for s in img.GetSpacing()))
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header.set_xyzt_units("mm")
    return header


def source_order(datasets: list, origin_lps) -> list:
    """The slice datasets in the mask's z order: along their normal, starting at the volume's origin (the first
    slice SimpleITK's series reader puts at z = 0)."""
    if len(datasets) == 1:
        return datasets
    o = np.array([float(v) for v in datasets[0].ImageOrientationPatient])
    normal = np.cross(o[:3], o[3:])
    ordered = sorted(datasets, key=lambda d: float(np.array([float(v) for v in d.ImagePositionPatient]) @ normal))
    first = np.array([float(v) for v in ordered[0].ImagePositionPatient])
    last = np.array([float(v) for v in ordered[-1].ImagePositionPatient])
    origin = np.asarray(origin_lps, float)
    return ordered if np.linalg.norm(first - origin) <= np.linalg.norm(last - origin) else ordered[::-1]


def segmentation_bytes(mask_zyx: np.ndarray, source_urls: list[str], origin_lps, labels: dict, model_name: str,
                       fingerprint: str, version: str) -> bytes:
    """A DICOM Segmentation (highdicom) of a (z, y, x) label mask over its source series: one segment per
    foreground label of dataset.json, named after it, labelled by an automatic algorithm ("trtseg", its version
    and the model fingerprint), referencing every source instance. Empty frames are left out, as highdicom does."""
    import io

    pydicom()  # pydicom importable first (see pydicom()), then highdicom
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    with tempfile.TemporaryDirectory(prefix="trtseg_seg_") as tmp:
        datasets = [pydicom().dcmread(p) for p in _local_files(source_urls, tmp)]
    datasets = source_order(datasets, origin_lps)
    names = {int(v): k for k, v in labels.items() if isinstance(v, int) and int(v) > 0}
    values = sorted(set(names) | {int(v) for v in np.unique(mask_zyx) if v > 0})
    numbers = np.zeros(int(max(values, default=0)) + 1, dtype=np.uint16)
    numbers[values] = np.arange(1, len(values) + 1)  # highdicom wants segment numbers 1, 2, ...
    algorithm = hd.AlgorithmIdentificationSequence(name="trtseg", version=f"{version} {fingerprint}"[:64],
                                                   family=codes.cid7162.ArtificialIntelligence)
    segments = [hd.seg.SegmentDescription(
        segment_number=i + 1, segment_label=names.get(v, f"label {v}")[:64],
        segmented_property_category=codes.SCT.Tissue, segmented_property_type=codes.SCT.Tissue,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm)
        for i, v in enumerate(values)]
    seg = hd.seg.Segmentation(
        source_images=datasets, pixel_array=numbers[mask_zyx] if values else mask_zyx.astype(np.uint16),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=segments,
        series_instance_uid=generate_uid(), series_number=9001, sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer="trtseg", manufacturer_model_name=model_name[:64] or "trtseg", software_versions=version,
        device_serial_number=fingerprint[:16] or "0", series_description="trtseg segmentation")
    buf = io.BytesIO()
    seg.save_as(buf)
    return buf.getvalue()
