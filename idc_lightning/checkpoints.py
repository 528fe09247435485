"""Read a self-describing checkpoint: the model, its preprocessing, operating point and patients, in one record.

Checkpoints given to eval and predict may come from anywhere, so they are loaded weights-only (no pickled code
runs) and checked strictly. Every setting a later step needs is taken from here, never re-typed in its YAML.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from idc_lightning import __version__
from idc_lightning.data.datamodule import IDCDataModule
from idc_lightning.evaluation.operating_point import OperatingPoint
from idc_lightning.models.classifier import RUN_KEY, IDCClassifier
from idc_lightning.preprocessing import Preprocessing

log = logging.getLogger(__name__)

DATA_KEY = IDCDataModule.__qualname__
# data.* settings that must match the checkpoint; null in eval.yaml/predict.yaml means "as trained".
PREPROCESSING_KEYS = ("patch_size", "image_size", "mean", "std", "pad_value", "stain_norm", "microns_per_pixel")
ALLOW_SWITCH = "allow_preprocessing_change=true"


class CheckpointError(ValueError):
    """The file is not a usable checkpoint of this model, or the command contradicts it."""


@dataclass(frozen=True)
class RunCheckpoint:
    """What a checkpoint of idc_lightning.train says about the model it holds."""

    path: Path
    state: dict[str, Any]
    hyper_parameters: dict[str, Any]
    preprocessing: Preprocessing
    operating_point: OperatingPoint
    patients: dict[str, list[str]]
    manifest_fingerprint: str
    package_version: str
    data_root: str

    @property
    def seen_patients(self) -> list[str]:
        """Patients the model was fitted to or had its checkpoint and threshold chosen on."""
        return sorted({*self.patients.get("train", []), *self.patients.get("val", [])})

    def model(self) -> IDCClassifier:
        """The trained classifier in eval mode, with the operating point it was validated at."""
        model = IDCClassifier(**{**self.hyper_parameters, "pretrained": False})
        # torch.compile saves the backbone under "_orig_mod"; the model is compiled only later, by the trainer.
        state = {key.replace("._orig_mod", ""): value for key, value in self.state.items()}
        target = model.state_dict()
        missing, unexpected = sorted(set(target) - set(state)), sorted(set(state) - set(target))
        mismatched = [key for key in target if key in state and state[key].shape != target[key].shape]
        if missing or unexpected or mismatched:
            raise CheckpointError(f"{self.path} does not fit an IDCClassifier built from its own hyper-parameters: "
                                  f"missing {missing[:5]}, unexpected {unexpected[:5]}, other shapes {mismatched[:5]}")
        model.load_state_dict(state)
        model.operating_point = self.operating_point
        return model.eval()


def _load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"ckpt_path={path} does not exist; give a .ckpt written by idc_lightning.train")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (torch.save writes zip archives)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain values, so it was not loaded "
            f"(weights-only loading refuses to run pickled code): {str(error).splitlines()[0]}"
        ) from error
    except (RuntimeError, EOFError) as error:
        raise CheckpointError(f"{path} is not a PyTorch checkpoint: {error}") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} has no 'state_dict': not a Lightning checkpoint")
    return checkpoint


def read_checkpoint(path: str | Path) -> RunCheckpoint:
    """Load and check a checkpoint written by idc_lightning.train (weights-only: no pickled code runs)."""
    path = Path(path)
    checkpoint = _load(path)
    missing = [key for key in (RUN_KEY, DATA_KEY, "hyper_parameters", "datamodule_hyper_parameters")
               if key not in checkpoint]
    if missing:
        raise CheckpointError(
            f"{path} is not a checkpoint of this model (IDCClassifier trained by idc_lightning.train {__version__}): "
            f"it lacks {missing}, which carry its preprocessing, operating point and patients; retrain it"
        )
    run, data = checkpoint[RUN_KEY], checkpoint[DATA_KEY]
    if run["package_version"] != __version__:
        log.warning("%s was written by idc_lightning %s; this is %s", path, run["package_version"], __version__)
    return RunCheckpoint(
        path=path,
        state=checkpoint["state_dict"],
        hyper_parameters=dict(checkpoint["hyper_parameters"]),
        preprocessing=Preprocessing.from_dict(data["preprocessing"]),
        operating_point=OperatingPoint.from_dict(run["operating_point"]),
        patients={name: list(ids) for name, ids in data["patients"].items()},
        manifest_fingerprint=data["manifest_fingerprint"],
        package_version=run["package_version"],
        data_root=str(checkpoint["datamodule_hyper_parameters"]["root"]),
    )


def preprocessing_settings(data: DictConfig, checkpoint: RunCheckpoint, allow_change: bool) -> dict[str, Any]:
    """data.* preprocessing for eval/predict: the checkpoint's, where the command leaves them null.

    A value given on the command line that contradicts the checkpoint is an error naming both, unless
    allow_preprocessing_change=true, for users who evaluate under another preprocessing on purpose.
    """
    trained = checkpoint.preprocessing.to_dict()
    settings, contradictions = {}, {}
    for key in PREPROCESSING_KEYS:
        given = data.get(key)
        if given is None:
            settings[key] = trained[key]
            continue
        given = tuple(given) if isinstance(trained[key], tuple) else given
        settings[key] = given
        if given != trained[key]:
            contradictions[key] = (given, trained[key])
    if contradictions:
        listed = "; ".join(f"data.{key}={value!r} but the checkpoint was trained with {expected!r}"
                           for key, (value, expected) in contradictions.items())
        if not allow_change:
            raise CheckpointError(f"{checkpoint.path}: {listed}. Leave these unset to use the checkpoint's values, or "
                                  f"add {ALLOW_SWITCH} to evaluate under a different preprocessing on purpose")
        log.warning("Preprocessing differs from training (%s): %s", ALLOW_SWITCH, listed)
    return {key: list(value) if isinstance(value, tuple) else value for key, value in settings.items()}
