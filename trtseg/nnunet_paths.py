"""nnUNetv2_predict's addressing: -d DATASET -c CONFIGURATION [-tr TRAINER] [-p PLANS], resolved under
$nnUNet_results to the trained-model folder, as nnunetv2's get_output_folder resolves it."""
from __future__ import annotations

import os

from trtseg.errors import TrtsegError


def _candidates(dataset_id: int) -> list[str]:
    """Dataset folder names "DatasetNNN_*" under $nnUNet_preprocessed, $nnUNet_raw and $nnUNet_results
    (nnunetv2's find_candidate_datasets)."""
    prefix = "Dataset%03d" % dataset_id
    names: set[str] = set()
    for var in ("nnUNet_preprocessed", "nnUNet_raw", "nnUNet_results"):
        root = os.environ.get(var)
        if root and os.path.isdir(root):
            names |= {d for d in os.listdir(root) if d.startswith(prefix) and os.path.isdir(os.path.join(root, d))}
    return sorted(names)


def dataset_name(dataset: str) -> str:
    """A dataset given as name (Dataset123_Liver) or id (123, 0123) -> its name."""
    if dataset.startswith("Dataset"):
        return dataset
    try:
        dataset_id = int(dataset)
    except ValueError:
        raise TrtsegError(f"-d {dataset}: give a dataset id (an integer) or a name starting with 'Dataset'") from None
    found = _candidates(dataset_id)
    if len(found) != 1:
        roots = ", ".join(f"{v}={os.environ.get(v)}" for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"))
        what = "no dataset" if not found else f"{len(found)} datasets ({', '.join(found)})"
        raise TrtsegError(f"-d {dataset}: {what} with id {dataset_id:03d} under {roots}")
    return found[0]


def model_folder(dataset: str, configuration: str, trainer: str = "nnUNetTrainer", plans: str = "nnUNetPlans") -> str:
    """$nnUNet_results/DATASET/TRAINER__PLANS__CONFIGURATION, the folder nnUNetv2_predict reads."""
    results = os.environ.get("nnUNet_results")
    if not results:
        raise TrtsegError("-d needs $nnUNet_results (the folder nnU-Net's trained models are under); or give the "
                          "model folder with -m")
    folder = os.path.join(results, dataset_name(dataset), f"{trainer}__{plans}__{configuration}")
    if not os.path.isdir(folder):
        raise TrtsegError(f"{folder}: no trained model folder for -d {dataset} -c {configuration} -tr {trainer} "
                          f"-p {plans}")
    return folder
