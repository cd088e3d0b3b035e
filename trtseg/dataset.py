"""Listing a dataset: which cases an input folder (any fsspec URL) holds, and where each case's output goes.

nnU-Net's naming: CASE_0000.nii.gz, CASE_0001.nii.gz, ... one file per channel, in any format trtseg reads
(.nii.gz, .nii, .nrrd, .mha, .mhd: trtseg/formats.py). Any other image file is a case of its own (a NIfTI file's
channels, if any, along its 4th axis). The output of CASE is OUTPUT/CASE with the input's ending.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from trtseg import formats, storage
from trtseg.errors import TrtsegError, one_line

_ENDING = r"(?P<ending>\.nii\.gz|\.nii|\.nrrd|\.mha|\.mhd)"
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})" + _ENDING + "$", re.IGNORECASE)
_NIFTI = re.compile(r"^(?P<case>.+?)" + _ENDING + "$", re.IGNORECASE)  # any single image file
_DATA_FILES = (".raw", ".zraw")  # a MetaImage .mhd's voxels, beside it
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class Case:
    """case_id: safe for any store (letters, digits, '.', '_', '-'; never '.' or '..' or a leading dot).
    files: the channel URLs, in channel order. problem: why the listing alone shows the case cannot run."""

    case_id: str
    files: tuple[str, ...]
    problem: str | None = None
    #: what the input's files are, from the listing: per channel file its object store ETag (and version id), else
    #: its size and modification time; a rerun redoes the case when it changed (trtseg/ledger.py)
    identity: str = ""
    #: ledger entries of earlier runs that this run's entry replaces (trtseg/ledger.py)
    replaces: tuple[str, ...] = ()
    #: why this run does the case: new, input changed, settings changed, mask missing, ...
    reason: str = ""

    @property
    def ending(self) -> str:
        """The image ending of the case's files (".nii.gz", ".nrrd", ...): its mask is written in that format
        (a DICOM series: ".dcm", its mask as NIfTI or a DICOM Segmentation, see trtseg.pipeline.mask_ending)."""
        name = self.files[0].rsplit("/", 1)[-1]
        return ".dcm" if name.lower().endswith(".dcm") else formats.ending(name) or ".nii.gz"


def safe_case_id(name: str) -> str:
    """A case id that cannot leave the output root nor upset an object store."""
    cid = _SAFE.sub("_", name).lstrip(".")
    return cid if cid and cid not in (".", "..") else "_" + name.encode().hex()[:32]


def list_cases(input_url: str, num_channels: int | None = None,
               storage_options: storage.StorageOptions | None = None, allow_empty: bool = True) -> list[Case]:
    """Cases of ``input_url`` (a folder, or a single image file), sorted by case id.

    allow_empty False: a folder with no case is an error that says what it holds instead (`trtseg predict`
    without --allow-empty), so that a wrong folder or format never passes as an empty run."""
    try:
        cases, ignored = storage.retrying(lambda: _list_cases(input_url, num_channels, storage_options), input_url)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise TrtsegError(storage.redact(f"{input_url}: cannot list the input ({one_line(e, 300)})",
                                         storage_options)) from None
    if not cases and not allow_empty:
        if ignored:
            found = ", ".join(f"{n} file(s) ending {e or '(no ending)'}" for e, n in sorted(ignored.items()))
            raise TrtsegError(f"{input_url}: no case trtseg can read: {found}; trtseg reads "
                              f"{', '.join(formats.ENDINGS)} and DICOM series (a folder of .dcm files per case; "
                              "give --allow-empty to accept an empty input)")
        raise TrtsegError(f"{input_url}: the input folder holds no files (give --allow-empty to accept an empty "
                          f"input)")
    return cases


def file_identity(info: dict) -> str:
    """One file's identity from an fsspec listing entry: ETag (+ VersionId) on object stores, else size and
    modification time."""
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("md5_hash")
    version = info.get("VersionId") or info.get("version_id") or info.get("generation")
    if etag:
        return f"etag:{str(etag).strip(chr(34))}" + (f"@{version}" if version else "")
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("updated")
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    return f"size:{info.get('size')}:mtime:{mtime}"


def _ignored_ending(name: str) -> str:
    return ("." + name.rsplit(".", 1)[-1].lower()) if "." in name else ""


def _dicom_series(fs, path: str, url_of) -> tuple[tuple[str, ...], None, str] | None:
    """(files, problem, identity) of a subfolder that holds a DICOM series (.dcm files), else None. The identity
    is a hash of every file's listing identity: a replaced, added or removed slice changes it."""
    import hashlib

    from trtseg import dicom

    entries = sorted(fs.ls(path, detail=True), key=lambda e: e["name"])
    names = [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries]
    if not dicom.is_series_listing(names):
        return None
    keep = set(dicom.series_files(names))
    chosen = [e for e, n in zip(entries, names) if n in keep]
    digest = hashlib.sha256("|".join(f"{e['name']}={file_identity(e)}" for e in chosen).encode()).hexdigest()[:24]
    return tuple(url_of(e["name"]) for e in chosen), None, f"series:{len(chosen)}:{digest}"


def _list_cases(input_url: str, num_channels: int | None, storage_options) -> tuple[list[Case], dict[str, int]]:
    fs, path = storage.filesystem(input_url, storage_options)
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol

    def url_of(p: str) -> str:
        return p if protocol in ("file", "local") else f"{protocol}://{p}"

    if fs.isfile(path):
        name = path.rsplit("/", 1)[-1]
        m = _NIFTI.match(name)
        cid = (_CHANNEL.match(name) or m).group("case") if m else name  # type: ignore[union-attr]
        return [Case(safe_case_id(cid), (url_of(path),), identity=file_identity(fs.info(path)))], {}
    if not fs.isdir(path):
        raise FileNotFoundError(f"{input_url}: input folder not found")
    grouped: dict[str, dict[int, str]] = {}
    single: dict[str, str] = {}
    clashes: dict[str, list[str]] = {}  # case id -> files that claim the same input (a_0000.nii and a_0000.nii.gz)
    ignored: dict[str, int] = {}
    dicom_cases: list[Case] = []  # subfolders holding a DICOM series (trtseg/dicom.py)
    infos = {}  # url -> identity, from this one listing
    fs.invalidate_cache(path)  # a scheduled rerun must see scans replaced since any cached listing
    for entry in sorted(fs.ls(path, detail=True), key=lambda e: e["name"]):
        p = entry["name"]
        infos[url_of(p)] = file_identity(entry)
        name = p.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("."):
            continue
        m = _CHANNEL.match(name)
        if m:
            chans = grouped.setdefault(m.group("case"), {})
            ch = int(m.group("ch"))
            if ch in chans:
                clashes.setdefault(m.group("case"), [chans[ch]]).append(url_of(p))
            chans[ch] = url_of(p)
        elif _NIFTI.match(name):
            cid = _NIFTI.match(name).group("case")  # type: ignore[union-attr]
            if cid in single:
                clashes.setdefault(cid, [single[cid]]).append(url_of(p))
            single[cid] = url_of(p)
        elif entry.get("type") == "directory":
            series = _dicom_series(fs, p, url_of)
            if series is not None:
                dicom_cases.append(Case(safe_case_id(name), *series))
        elif not name.lower().endswith(_DATA_FILES):
            ignored[_ignored_ending(name)] = ignored.get(_ignored_ending(name), 0) + 1
    cases = []
    for cid, chans in grouped.items():
        files = tuple(chans[k] for k in sorted(chans))
        problem = None
        if cid in clashes:
            problem = f"two inputs for one case: {' and '.join(clashes[cid])}; keep one"
        elif len({_NIFTI.match(f.rsplit('/', 1)[-1]).group("ending").lower()  # type: ignore[union-attr]
                  for f in files}) > 1:
            problem = "channel files of one case in different formats"
        elif sorted(chans) != list(range(len(chans))):
            problem = f"channel files {sorted(chans)} are not numbered 0..{len(chans) - 1}"
        elif num_channels is not None and len(chans) != num_channels:
            problem = f"case has {len(chans)} channel file(s), the model expects {num_channels}"
        cases.append(Case(safe_case_id(cid), files, problem, "|".join(infos[f] for f in files)))
    for cid, url in single.items():
        cases.append(Case(safe_case_id(cid), (url,), f"two inputs for one case: {' and '.join(clashes[cid])}; keep one"
                          if cid in clashes else None, infos[url]))
    cases += dicom_cases
    if not cases and ignored.get(".dcm"):  # -i is one series' folder: it is the case
        series = _dicom_series(fs, path, url_of)
        if series is not None:
            cases, ignored = [Case(safe_case_id(path.rstrip("/").rsplit("/", 1)[-1]), *series)], {}
    ids = [c.case_id for c in cases]
    dupes = {i for i in ids if ids.count(i) > 1}
    cases = [Case(c.case_id, c.files, c.problem or f"case id {c.case_id!r} is shared by several inputs", c.identity)
             if c.case_id in dupes else c for c in cases]
    return sorted(cases, key=lambda c: c.case_id), ignored
