"""Listing a dataset: which cases an input folder (any fsspec URL) holds, and where each case's output goes.

nnU-Net's naming: CASE_0000.nii.gz, CASE_0001.nii.gz, ... one file per channel. Any other .nii/.nii.gz file is a
case of its own (channels, if any, along its 4th axis). The output of CASE is OUTPUT/CASE.nii.gz.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from trtseg import storage
from trtseg.errors import TrtsegError, one_line

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})\.nii(\.gz)?$")
_NIFTI = re.compile(r"^(?P<case>.+?)\.nii(\.gz)?$")
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class Case:
    """case_id: safe for any store (letters, digits, '.', '_', '-'; never '.' or '..' or a leading dot).
    files: the channel URLs, in channel order. problem: why the listing alone shows the case cannot run."""

    case_id: str
    files: tuple[str, ...]
    problem: str | None = None


def safe_case_id(name: str) -> str:
    """A case id that cannot leave the output root nor upset an object store."""
    cid = _SAFE.sub("_", name).lstrip(".")
    return cid if cid and cid not in (".", "..") else "_" + name.encode().hex()[:32]


def list_cases(input_url: str, num_channels: int | None = None,
               storage_options: storage.StorageOptions | None = None) -> list[Case]:
    """Cases of ``input_url`` (a folder, or a single NIfTI file), sorted by case id."""
    try:
        return storage.retrying(lambda: _list_cases(input_url, num_channels, storage_options), input_url)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise TrtsegError(storage.redact(f"{input_url}: cannot list the input ({one_line(e, 300)})",
                                         storage_options)) from None


def _list_cases(input_url: str, num_channels: int | None, storage_options) -> list[Case]:
    fs, path = storage.filesystem(input_url, storage_options)
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol

    def url_of(p: str) -> str:
        return p if protocol in ("file", "local") else f"{protocol}://{p}"

    if fs.isfile(path):
        name = path.rsplit("/", 1)[-1]
        m = _NIFTI.match(name)
        cid = (_CHANNEL.match(name) or m).group("case") if m else name  # type: ignore[union-attr]
        return [Case(safe_case_id(cid), (url_of(path),))]
    if not fs.isdir(path):
        raise FileNotFoundError(f"{input_url}: input folder not found")
    grouped: dict[str, dict[int, str]] = {}
    single: dict[str, str] = {}
    for p in sorted(fs.ls(path, detail=False)):
        name = p.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("."):
            continue
        m = _CHANNEL.match(name)
        if m:
            grouped.setdefault(m.group("case"), {})[int(m.group("ch"))] = url_of(p)
        elif _NIFTI.match(name):
            single[_NIFTI.match(name).group("case")] = url_of(p)  # type: ignore[union-attr]
    cases = []
    for cid, chans in grouped.items():
        files = tuple(chans[k] for k in sorted(chans))
        problem = None
        if sorted(chans) != list(range(len(chans))):
            problem = f"channel files {sorted(chans)} are not numbered 0..{len(chans) - 1}"
        elif num_channels is not None and len(chans) != num_channels:
            problem = f"case has {len(chans)} channel file(s), the model expects {num_channels}"
        cases.append(Case(safe_case_id(cid), files, problem))
    for cid, url in single.items():
        cases.append(Case(safe_case_id(cid), (url,)))
    ids = [c.case_id for c in cases]
    dupes = {i for i in ids if ids.count(i) > 1}
    cases = [Case(c.case_id, c.files, c.problem or f"case id {c.case_id!r} is shared by several inputs")
             if c.case_id in dupes else c for c in cases]
    return sorted(cases, key=lambda c: c.case_id)
