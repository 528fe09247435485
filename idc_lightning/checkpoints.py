"""Read a self-describing checkpoint: the model, its preprocessing, operating point and patients, in one record.

Checkpoints given to eval and predict may come from anywhere, so they are loaded weights-only (no pickled code
runs) and checked strictly. Every setting a later step needs is taken from here, never re-typed in its YAML.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from idc_lightning import __version__
from idc_lightning.callbacks.sweep_summary import job_folders
from idc_lightning.data.datamodule import IDCDataModule
from idc_lightning.evaluation.operating_point import OperatingPoint
from idc_lightning.models.classifier import RUN_KEY, IDCClassifier
from idc_lightning.models.ensemble import FoldEnsemble
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


@dataclass(frozen=True)
class EnsembleCheckpoint:
    """Several checkpoints of one recipe (the folds of a cross-validation) read as one model: the mean of their
    probabilities, called at the mean of their operating points (each chosen on its own validation patients)."""

    path: Path
    members: tuple[RunCheckpoint, ...]

    def __post_init__(self) -> None:
        first = self.members[0]
        for member in self.members[1:]:
            differences = member.preprocessing.differences(first.preprocessing)
            if differences:
                listed = "; ".join(f"{key} {mine!r} against {theirs!r}" for key, (mine, theirs) in differences.items())
                raise CheckpointError(f"{member.path} and {first.path} were trained with different preprocessing "
                                      f"({listed}); the models of an ensemble read the same patches")
        if len({tuple(sorted(member.patients.get("test", []))) for member in self.members}) > 1:
            log.warning("%s: the models held out different test patients; the ensemble is tested on the patients "
                        "none of them trained or validated on", self.path)

    @property
    def preprocessing(self) -> Preprocessing:
        return self.members[0].preprocessing

    @property
    def hyper_parameters(self) -> dict[str, Any]:
        return self.members[0].hyper_parameters

    @property
    def operating_point(self) -> OperatingPoint:
        points = [member.operating_point for member in self.members]
        methods = sorted({f"{point.method} on {point.chosen_on}" for point in points})
        return OperatingPoint(threshold=float(sum(point.threshold for point in points) / len(points)),
                              method=f"mean over {len(points)} models ({', '.join(methods)})",
                              chosen_on="val", coverage=min(point.coverage for point in points))

    @property
    def patients(self) -> dict[str, list[str]]:
        """Train and val: every member's (each fold's validation patients trained the others); test: shared ones."""
        union = {name: sorted({p for m in self.members for p in m.patients.get(name, [])}) for name in ("train", "val")}
        tests = [set(member.patients.get("test", [])) for member in self.members]
        return {**union, "test": sorted(set.intersection(*tests))}

    @property
    def seen_patients(self) -> list[str]:
        return sorted({p for member in self.members for p in member.seen_patients})

    @property
    def data_root(self) -> str:
        roots = sorted({member.data_root for member in self.members})
        if len(roots) > 1:
            raise CheckpointError(f"{self.path}: the models were trained on different trees ({roots}); "
                                  f"give data.root")
        return roots[0]

    def model(self) -> FoldEnsemble:
        return FoldEnsemble([member.model() for member in self.members], self.operating_point).eval()


def _best_in(folder: Path, pattern: str = "checkpoints/*.ckpt") -> list[Path]:
    """Checkpoints other than the resume point (last.ckpt), whatever callbacks.model_checkpoint.filename names
    them."""
    return sorted(path for path in folder.glob(pattern) if not path.name.startswith("last"))


def best_checkpoints(folder: Path) -> list[Path]:
    """The best checkpoint of each job of a sweep folder (<job>/checkpoints/), or of one run folder."""
    found = _best_in(folder) or _best_in(folder, "*/checkpoints/*.ckpt")
    without = [job.name for job in job_folders(folder) if not _best_in(job)]
    if found and without:
        log.warning("%s: jobs %s have no best checkpoint (failed, or still running); the ensemble leaves them out",
                    folder, without)
    if not found:
        raise CheckpointError(f"ckpt_path={folder} is a folder without a best checkpoint in checkpoints/ or "
                              f"*/checkpoints/ (last.ckpt is only the resume point); give a run or sweep folder "
                              f"of idc_lightning.train, or .ckpt files")
    per_run: dict[Path, list[Path]] = {}
    for path in found:
        per_run.setdefault(path.parent, []).append(path)
    several = {str(run): [p.name for p in paths] for run, paths in per_run.items() if len(paths) > 1}
    if several:
        raise CheckpointError(f"ckpt_path={folder}: more than one best checkpoint in {several} "
                              f"(callbacks.model_checkpoint.save_top_k > 1); list the .ckpt files to use instead")
    return found


def read_model_checkpoint(ckpt_path: str | Path | Sequence[str | Path]) -> RunCheckpoint | EnsembleCheckpoint:
    """`ckpt_path` of eval, predict and export: a .ckpt file; a run or sweep folder (the best checkpoint of every
    job); or a list of .ckpt files. More than one checkpoint makes a FoldEnsemble."""
    if isinstance(ckpt_path, str | Path):
        path = Path(ckpt_path)
        if not path.is_dir():
            return read_checkpoint(path)
        paths, label = best_checkpoints(path), path
    else:
        paths = [Path(p) for p in ckpt_path]
        if not paths:
            raise CheckpointError("ckpt_path=[] names no checkpoint")
        label = Path(os.path.commonpath([p.absolute() for p in paths]))
    members = tuple(read_checkpoint(p) for p in paths)
    if len(members) == 1:
        return members[0]
    log.info("Ensemble of %d checkpoints: %s", len(members), ", ".join(str(p) for p in paths))
    return EnsembleCheckpoint(label, members)


def preprocessing_settings(data: DictConfig, checkpoint: RunCheckpoint | EnsembleCheckpoint,
                           allow_change: bool) -> dict[str, Any]:
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
