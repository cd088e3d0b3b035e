"""The models a run applies to each case: one model folder, an ensemble of configurations, and a cascade's stages.

``trtseg predict -m A [B ...]`` gives a ``ModelSet``. Each model is a *pass* over the case, in order:
- a ``3d_lowres`` folder that a ``3d_cascade_fullres`` folder of the list takes its previous stage from is a *stage*:
  its mask (on the image's grid, kept on the device) becomes the cascade's extra input channels, and is not
  written (nnU-Net's two commands, ``nnUNetv2_predict -c 3d_lowres`` then ``-c 3d_cascade_fullres
  -prev_stage_predictions``, in one job);
- every other folder is a *member*. One member's mask is the result. Several members are ensembled as
  ``nnUNetv2_ensemble`` does: the mean of their probabilities, each on the input's grid (float32, summed in list
  order, then divided), and the labels of that mean (argmax, or regions > 0.5 painted in regions_class_order).

``Combiner`` does that per case, on the device, for the single process (trtseg/predict.py) and for the Ray job's
owner actor (trtseg/jobs/actor.py) alike. The case-level stages (stamp, skip, write, report) see the set through
the same attributes as one model: labels, channels, postprocessing, fingerprint, folds.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import torch

from trtseg.errors import ModelFolderError, TrtsegError
from trtseg.export import labels_of_probabilities
from trtseg.model import LabelScheme, NnUNetModel
from trtseg.postprocess import NONE, Postprocessing

MEMBER, STAGE = "member", "stage"


@dataclass(frozen=True)
class ModelSet:
    """models: every pass, in run order (a previous stage before its cascade); roles: MEMBER or STAGE per model;
    previous: per model, the index of the stage whose mask it takes (None: none, or --prev-stage-predictions);
    postprocessing: applied to the final mask (--postprocessing, or a lone model folder's own)."""

    models: tuple[NnUNetModel, ...]
    roles: tuple[str, ...]
    previous: tuple[int | None, ...]
    postprocessing: Postprocessing = NONE

    @classmethod
    def of(cls, model: "NnUNetModel | ModelSet") -> "ModelSet":
        if isinstance(model, ModelSet):
            return model
        return cls((model,), (MEMBER,), (None,), model.postprocessing)

    @classmethod
    def build(cls, models: list[NnUNetModel]) -> "ModelSet":
        """Orders ``models`` (each previous stage first), gives each its role, and checks that the members can be
        ensembled: one error naming the folder otherwise."""
        if not models:
            raise TrtsegError("give at least one model folder with -m")
        if len(models) == 1:
            return cls.of(models[0])
        by_config = {m.configuration_name: i for i, m in enumerate(models)}
        needed = {by_config[m.previous_stage] for m in models if m.previous_stage in by_config}
        order = sorted(range(len(models)), key=lambda i: (i not in needed, i))  # stages first, else as given
        ordered = [models[i] for i in order]
        roles = tuple(STAGE if i in needed else MEMBER for i in order)
        position = {m.configuration_name: k for k, m in enumerate(ordered)}
        previous = tuple(position.get(m.previous_stage) if m.previous_stage else None for m in ordered)
        members = [m for m, r in zip(ordered, roles) if r == MEMBER]
        first = members[0]
        for m in ordered[1:] if len(members) > 1 else []:
            _check_same_labels(first, m)
        for m in ordered:
            if m.num_image_channels != first.num_image_channels:
                raise ModelFolderError(m.folder, f"takes {m.num_image_channels} image channel(s), {first.folder} "
                                                 f"{first.num_image_channels}: the models of one run read the same files")
        pp = first.postprocessing if len(members) == 1 else NONE
        return cls(tuple(ordered), roles, previous, pp)

    # -- what the case-level stages (trtseg/pipeline.py) read, as of one model --------------------------------------

    @property
    def members(self) -> list[int]:
        return [i for i, r in enumerate(self.roles) if r == MEMBER]

    @property
    def first(self) -> NnUNetModel:
        return self.models[self.members[0]]

    @property
    def labels(self) -> LabelScheme:
        return self.first.labels

    @property
    def num_image_channels(self) -> int:
        return self.first.num_image_channels

    @property
    def dataset_json(self) -> dict:
        return self.first.dataset_json

    @property
    def folder(self) -> str:
        return " + ".join(m.folder for m in self.models)

    @property
    def configuration_name(self) -> str:
        return " + ".join(m.configuration_name for m in self.models)

    @property
    def folds(self) -> list[str]:
        if len(self.models) == 1:
            return self.models[0].folds
        return [f"{m.configuration_name}:{f}" for m in self.models for f in m.folds]

    @property
    def fingerprint(self) -> str:
        """One model's own fingerprint; for several, a hash of each pass's fingerprint, folds and role, in order."""
        if len(self.models) == 1:
            return self.models[0].fingerprint
        parts = [f"{r}:{m.fingerprint}:{','.join(m.folds)}" for m, r in zip(self.models, self.roles)]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    @property
    def ensembled(self) -> bool:
        return len(self.members) > 1

    def needs_probabilities(self, index: int, save_probabilities: bool) -> bool:
        """Whether pass ``index``'s export must give probabilities: an ensemble member, or --save-probabilities."""
        return self.roles[index] == MEMBER and (self.ensembled or save_probabilities)

    def file_stage(self, index: int) -> bool:
        """Whether pass ``index`` is a cascade whose previous stage comes from --prev-stage-predictions."""
        return bool(self.models[index].previous_stage) and self.previous[index] is None

    def with_postprocessing(self, pp: Postprocessing) -> "ModelSet":
        return dataclasses.replace(self, postprocessing=pp)

    def without_weights(self) -> "ModelSet":
        return dataclasses.replace(self, models=tuple(m.without_weights() for m in self.models))

    def describe(self) -> list[dict]:
        """Per pass: its folder, configuration, role, folds and the stage it takes (for the run report)."""
        return [{"folder": m.folder, "configuration": m.configuration_name, "role": r, "folds": m.folds,
                 "fingerprint": m.fingerprint, "previous_stage": None if p is None else self.models[p].folder}
                for m, r, p in zip(self.models, self.roles, self.previous)]


def _check_same_labels(a: NnUNetModel, b: NnUNetModel) -> None:
    if (a.labels.labels, a.labels.regions, a.labels.regions_class_order) != \
            (b.labels.labels, b.labels.regions, b.labels.regions_class_order):
        raise ModelFolderError(b.folder, f"its labels {b.labels.labels} (regions {b.labels.regions}) differ from "
                                         f"{a.folder}'s {a.labels.labels} (regions {a.labels.regions}): only models "
                                         "with the same labels can be ensembled")


class Combiner:
    """One case's passes on the device: the stages' masks (for the cascades after them), and the members' result,
    one mask as it came or the mean of several members' probabilities.

    Masks are (z, y, x) on the input's grid, in the input's axis order, in the mask's dtype; probabilities are
    (k, z, y, x) float32 on the same grid (export_on_device's results)."""

    def __init__(self, models: ModelSet, save_probabilities: bool):
        self.models, self.save_probabilities = models, save_probabilities
        self.stage_masks: dict[int, torch.Tensor] = {}
        self._sum: torch.Tensor | None = None
        self._n = 0
        self._result: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def add(self, index: int, mask: torch.Tensor, probabilities: torch.Tensor | None) -> None:
        if self.models.roles[index] == STAGE:
            self.stage_masks[index] = mask
        elif not self.models.ensembled:
            self._result = (mask, probabilities)
        else:
            assert probabilities is not None, "an ensemble member's export must give probabilities"
            # float32, summed in list order, as nnUNetv2_ensemble's average_probabilities
            self._sum = probabilities.clone() if self._sum is None else self._sum.add_(probabilities)
            self._n += 1

    def previous_mask(self, index: int) -> torch.Tensor | None:
        """The mask of the stage pass ``index`` takes (None for a file stage or no cascade)."""
        p = self.models.previous[index]
        return None if p is None else self.stage_masks[p]

    def result(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the final mask (z, y, x), the probabilities (k, z, y, x) with --save-probabilities, else None)."""
        if self._result is not None:
            return self._result
        assert self._sum is not None and self._n == len(self.models.members), "not every member was added"
        mean = self._sum.div_(self._n)
        labels = self.models.labels
        seg = labels_of_probabilities(mean, labels)
        mask = seg.to(torch.uint8 if labels.mask_dtype == "uint8" else torch.int32)
        return mask, (mean if self.save_probabilities else None)
