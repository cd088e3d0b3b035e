"""Any trained-model folder trtseg takes: nnU-Net v2 (dataset.json, plans.json, fold_N/checkpoint_final.pth;
trtseg/model.py) or nnU-Net v1 (plans.pkl, fold_N/*.model; trtseg/model_v1.py), told apart by their files."""
from __future__ import annotations

from trtseg import model_v1, storage
from trtseg.model import NnUNetModel, load_v2_model_folder


def load_model_folder(folder: str, folds: list[str] | None = None,
                      checkpoint_name: str = "checkpoint_final.pth") -> NnUNetModel:
    """Loads an nnU-Net v2 trained model folder, or a v1 one.

    folds: e.g. ["0", "1"] or ["all"]; None detects every fold that holds the checkpoint
    checkpoint_name: checkpoint_final.pth, or checkpoint_best.pth on request (v1: model_final_checkpoint by
        default, or model_best)
    """
    folder = str(folder).rstrip("/")
    if not storage.exists(storage.join(folder, "plans.json")) and model_v1.is_v1_folder(folder):
        v1_name = model_v1.V1_CHECKPOINT if checkpoint_name == "checkpoint_final.pth" else checkpoint_name
        return model_v1.load_v1_model_folder(folder, folds, v1_name)
    return load_v2_model_folder(folder, folds, checkpoint_name)


def load_models(folders: "str | list[str]", folds: list[str] | None = None,
                checkpoint_name: str = "checkpoint_final.pth") -> "ModelSet":
    """The run's models (trtseg/ensemble.py): one folder, or several (an ensemble of configurations, a cascade with
    its previous stage), each with the same folds and checkpoint name, as nnUNetv2_predict takes them per command."""
    from trtseg.ensemble import ModelSet

    folders = [folders] if isinstance(folders, str) else list(folders)
    return ModelSet.build([load_model_folder(f, folds, checkpoint_name) for f in folders])
