"""Everything a job run needs, as plain data that crosses process boundaries; its flags are declared with the
fields (``trtseg.options.opt``), so `trtseg predict` and the benchmarks take them from here."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from trtseg.options import Settings, opt


@dataclass
class JobConfig:
    """A `trtseg predict` run.

    input/output: folder URLs (any fsspec protocol); model: model folder URL (or a card, see model_card)
    address: Ray cluster to join; None joins the cluster of `ray job submit` ($RAY_ADDRESS) or starts a local Ray
    cpu_actors: run N CPU inference actors (the default where the cluster has no GPU: 1)
    gpus_per_actor: GPU share of each inference actor (fractions put several actors on one GPU)
    task_gpus: GPU share of each preprocessing/export task on GPU clusters (0: those run on the CPU)
    actor_resources: custom Ray resources each inference actor needs, e.g. {"accelerator_h100": 1} to keep actors
              on one node type of a mixed cluster (the launcher config and KubeRay groups declare such resources)
    max_cases_in_flight: volumes between reading and export at once (bounds host, GPU and object-store memory)
    tiles_per_task: tiles an actor takes in one call (smaller spreads a volume over more actors)
    partials: dtype of the partial logit sums the other actors ship to a case's owner actor ("fp16" halves the
              bytes; "fp32" gives the single-process path's masks bit for bit). With one actor none are shipped.
    """

    input: str
    output: str
    model: str | list[str] | None = None  # one folder, or several (trtseg/ensemble.py)
    folds: list[str] | None = None
    checkpoint: str = "checkpoint_final.pth"
    model_card: dict[str, Any] | None = None  # {"card": URL, "network": ..., "weights": ..., "onnx": ...}
    settings: Settings = field(default_factory=Settings)
    storage_options: dict[str, Any] | None = None
    address: str | None = opt(None, "--address", "Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")
    cpu_actors: int | None = opt(None, "--cpu-actors", "N inference actors on CPUs (default where no GPU: 1)", type=int)
    gpus_per_actor: float = opt(1.0, "--gpus-per-actor", "GPU share per inference actor (0.5: two per GPU)",
                                type=float)
    task_gpus: float = opt(0.0, "--task-gpus", "GPU share of preprocessing/export tasks (0: on CPUs)", type=float)
    actor_resources: dict[str, float] | None = opt(
        None, "--actor-resources", 'JSON of custom Ray resources each inference actor needs, e.g. '
        '\'{"accelerator_h100": 1}\'', type=json.loads)
    max_cases_in_flight: int = opt(3, "--max-cases-in-flight", "volumes between reading and writing at once", type=int)
    tiles_per_task: int = opt(8, "--tiles-per-task", "tiles an actor takes per call", type=int)
    partials: str = opt("fp16", "--partials", "dtype of partial sums sent to the reducer", choices=["fp16", "fp32"])
    overwrite: bool = opt(False, "--overwrite", "redo cases whose mask this model and these settings made",
                          action="store_true")
    dry_run: bool = opt(False, "--dry-run", "list the cases that would run (and be skipped) and stop",
                        action="store_true")
    limit: int | None = opt(None, "--limit", "process at most N cases", type=int)
    input_identity: str = opt("metadata", "--input-identity", "how a rerun tells a changed input: its listing's "
                              "ETag/version or size and modification time (metadata), or a SHA-256 of its bytes "
                              "(hash: reads every input)", choices=["metadata", "hash"])
    shard: str | None = opt(None, "--shard", "I/N: only shard I of N (0 <= I < N) of the cases, by a stable hash of "
                            "the case id, so that N independent jobs into one output cover each case once")
    allow_empty: bool = opt(False, "--allow-empty", "an input with no case trtseg can read is a run of 0 cases, "
                            "not an error", action="store_true")
    ray_from_cases: int | None = opt(None, "--ray-from-cases", "with no Ray cluster to join and at most one GPU, "
                                     "runs in one process, without starting Ray, unless the run has at least this "
                                     "many cases (default: any number: one engine on one GPU gains nothing from Ray; "
                                     "0: always Ray)", type=int)
    actor_restarts: int = 2
    task_retries: int = 3
    case_retries: int = 2  # a case whose summed tiles an actor lost (restart) is redone at most this often
    progress: bool = opt(True, "--no-progress", "no progress line", action="store_false")
    log_json: bool = opt(False, "--log-json", "structured JSON log lines on stderr", action="store_true")
    diagnostics: bool = opt(False, "--diagnostics", "actors record host times of case starts and exports in the "
                            "run report (stats' trace), to study the GPU's idle gaps", action="store_true")

# the flags every path takes (the rest are the Ray job's)
COMMON_FLAGS = ("overwrite", "dry_run", "limit", "allow_empty", "input_identity", "shard")
