"""Everything a job run needs, as plain data that crosses process boundaries."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trtseg.predict import Settings


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
    model: str | None = None
    folds: list[str] | None = None
    checkpoint: str = "checkpoint_final.pth"
    model_card: dict[str, Any] | None = None  # {"card": URL, "network": ..., "weights": ..., "onnx": ...}
    settings: Settings = field(default_factory=Settings)
    storage_options: dict[str, Any] | None = None
    address: str | None = None
    cpu_actors: int | None = None
    gpus_per_actor: float = 1.0
    task_gpus: float = 0.0
    actor_resources: dict[str, float] | None = None
    max_cases_in_flight: int = 3
    tiles_per_task: int = 8
    partials: str = "fp16"
    overwrite: bool = False
    dry_run: bool = False
    limit: int | None = None
    actor_restarts: int = 2
    task_retries: int = 3
    case_retries: int = 2  # a case whose summed tiles an actor lost (restart) is redone at most this often
    progress: bool = True
    log_json: bool = False
