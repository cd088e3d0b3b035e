"""The ledger: what made each mask in an output, so that a scheduled rerun redoes exactly what changed.

Layout: OUTPUT/.trtseg/ledger/ holds one small object per committed mask, named

    CASE~SETTINGS~INPUT~MASK.json

SETTINGS is a hash of the stamp (model fingerprint, folds, the settings that change masks, postprocessing), INPUT a
hash of the input's identity (per channel file its ETag/version on object stores, else size and modification time;
with ``--input-identity hash`` a SHA-256 of its bytes), MASK a hash of the committed mask's own identity (the same
kind, from the store right after the write): a mask replaced or rewritten since, by anyone, no longer matches. The JSON inside says the
same in full, with the time, for people. Why one object per entry and everything in its name:

- a rerun decides from one paginated listing of the ledger and one of the output (plus the input's), without
  opening any mask or entry: on an object store with 100 000 cases that is a few hundred list requests, not 100 000
  reads;
- each entry is written with one atomic PUT (local disks: a temporary file renamed), after its mask is committed:
  a killed driver leaves no entry for an uncommitted mask, and no half-written ledger;
- object stores have no atomic append, so a single ledger file would be corrupted or lost by concurrent jobs (the
  shards of one dataset) writing into one output; separate objects never collide.

A rerun redoes a case when its entry is missing (new), when the input or the settings changed, when the mask is
missing (deleted by a user) or when it is no longer the mask the entry recorded (replaced); it skips it otherwise.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

from trtseg import storage

LEDGER = ".trtseg/ledger"
RUNS = ".trtseg/runs"
SEP = "~"  # never in a case id (trtseg.dataset.safe_case_id keeps letters, digits, '.', '_', '-')


def key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Entry:
    case_id: str
    settings: str
    input: str
    mask: str

    @property
    def name(self) -> str:
        return f"{self.case_id}{SEP}{self.settings}{SEP}{self.input}{SEP}{self.mask}.json"

    @classmethod
    def parse(cls, name: str) -> "Entry | None":
        parts = name.removesuffix(".json").split(SEP)
        return cls(*parts) if len(parts) == 4 else None


def _names(url: str, storage_options=None) -> dict[str, str]:
    """name -> identity key of the files directly in ``url`` (one listing; empty when the folder does not
    exist)."""
    from trtseg.dataset import file_identity

    fs, path = storage.filesystem(url, storage_options)
    fs.invalidate_cache(path)  # other processes (Ray workers, other shards) wrote here since any cached listing
    try:
        listing = storage.retrying(lambda: fs.ls(path, detail=True), url)
    except FileNotFoundError:
        return {}
    return {e["name"].rstrip("/").rsplit("/", 1)[-1]: key(file_identity(e)) for e in listing
            if e.get("type") != "directory"}


def read(output_url: str, storage_options=None) -> dict[str, list[Entry]]:
    """case id -> its ledger entries, from one listing."""
    entries: dict[str, list[Entry]] = {}
    for name in _names(storage.join(output_url, LEDGER), storage_options):
        e = Entry.parse(name)
        if e is not None:
            entries.setdefault(e.case_id, []).append(e)
    return entries


def outputs(output_url: str, storage_options=None) -> dict[str, str]:
    """mask file name -> identity key, from one listing of the output."""
    return _names(output_url, storage_options)


def record(output_url: str, entry: Entry, details: dict, stale: list[str], storage_options=None) -> None:
    """Writes ``entry`` (after its mask was committed), then removes the case's older entries ``stale``."""
    body = json.dumps({**details, "case_id": entry.case_id,
                       "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, sort_keys=True)
    storage.write_bytes_atomic(storage.join(output_url, LEDGER, entry.name), body.encode(), storage_options)
    for name in stale:
        if name != entry.name:
            fs, path = storage.filesystem(storage.join(output_url, LEDGER, name), storage_options)
            try:
                fs.rm(path)
            except FileNotFoundError:
                pass


def decide(mask_name: str, settings_key: str, input_key: str, entries: list[Entry],
           masks: dict[str, str]) -> tuple[bool, str]:
    """(run it, why): the case's action from its entries and the output listing."""
    same = [e for e in entries if e.settings == settings_key and e.input == input_key]
    if same:
        if mask_name not in masks:
            return True, "mask missing"
        if masks[mask_name] != same[0].mask:
            return True, "mask replaced (not the one the ledger recorded)"
        return False, "unchanged"
    if not entries:
        return True, "new"
    if any(e.input == input_key for e in entries):
        return True, "settings changed"
    if any(e.settings == settings_key for e in entries):
        return True, "input changed"
    return True, "input and settings changed"


def mask_key(url: str, storage_options=None) -> str:
    """The identity key of a mask just written, as the output's listing will show it."""
    from trtseg.dataset import file_identity
    fs, path = storage.filesystem(url, storage_options)
    fs.invalidate_cache(path.rsplit("/", 1)[0])
    return key(file_identity(storage.retrying(lambda: fs.info(path), url)))


def content_identity(files, storage_options=None) -> str:
    """``--input-identity hash``: a SHA-256 of every channel file's bytes."""
    return "|".join("sha256:" + hashlib.sha256(storage.read_bytes(f, storage_options)).hexdigest() for f in files)


def shard_of(case_id: str, n: int) -> int:
    """The shard (0 .. n-1) a case belongs to: a stable hash of its id, the same on every machine and run."""
    return int(hashlib.sha256(case_id.encode()).hexdigest(), 16) % n
