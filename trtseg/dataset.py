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

    @property
    def ending(self) -> str:
        """The image ending of the case's files (".nii.gz", ".nrrd", ...): its mask is written in that format."""
        return formats.ending(self.files[0].rsplit("/", 1)[-1]) or ".nii.gz"


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
                              f"{', '.join(formats.ENDINGS)} (give --allow-empty to accept an empty input)")
        raise TrtsegError(f"{input_url}: the input folder holds no files (give --allow-empty to accept an empty "
                          f"input)")
    return cases


def _ignored_ending(name: str) -> str:
    return ("." + name.rsplit(".", 1)[-1].lower()) if "." in name else ""


def _list_cases(input_url: str, num_channels: int | None, storage_options) -> tuple[list[Case], dict[str, int]]:
    fs, path = storage.filesystem(input_url, storage_options)
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol

    def url_of(p: str) -> str:
        return p if protocol in ("file", "local") else f"{protocol}://{p}"

    if fs.isfile(path):
        name = path.rsplit("/", 1)[-1]
        m = _NIFTI.match(name)
        cid = (_CHANNEL.match(name) or m).group("case") if m else name  # type: ignore[union-attr]
        return [Case(safe_case_id(cid), (url_of(path),))], {}
    if not fs.isdir(path):
        raise FileNotFoundError(f"{input_url}: input folder not found")
    grouped: dict[str, dict[int, str]] = {}
    single: dict[str, str] = {}
    clashes: dict[str, list[str]] = {}  # case id -> files that claim the same input (a_0000.nii and a_0000.nii.gz)
    ignored: dict[str, int] = {}
    for p in sorted(fs.ls(path, detail=False)):
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
        elif not name.lower().endswith(_DATA_FILES) and not fs.isdir(p):
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
        cases.append(Case(safe_case_id(cid), files, problem))
    for cid, url in single.items():
        cases.append(Case(safe_case_id(cid), (url,), f"two inputs for one case: {' and '.join(clashes[cid])}; keep one"
                          if cid in clashes else None))
    ids = [c.case_id for c in cases]
    dupes = {i for i in ids if ids.count(i) > 1}
    cases = [Case(c.case_id, c.files, c.problem or f"case id {c.case_id!r} is shared by several inputs")
             if c.case_id in dupes else c for c in cases]
    return sorted(cases, key=lambda c: c.case_id), ignored
