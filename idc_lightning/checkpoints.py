"""Load checkpoints given to eval/predict without executing pickled code (they may come from anywhere)."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn


class CheckpointError(ValueError):
    """The file is not a usable checkpoint of this model."""


def load_weights(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Weights-only torch.load, then a strict state-dict match: wrong files fail loudly, never half-load."""
    path = Path(path)
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
    # torch.compile saves the backbone under "_orig_mod"; the model is compiled only later, by the trainer.
    state = {key.replace("._orig_mod", ""): value for key, value in checkpoint["state_dict"].items()}
    target = model.state_dict()
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} is not a checkpoint of this model (IDCClassifier with ResNet-18): "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    mismatched = [key for key in target if state[key].shape != target[key].shape]
    if mismatched:
        raise CheckpointError(f"{path} does not match this model's shapes at {mismatched[:5]} (model.adapt_stem?)")
    model.load_state_dict(state)
    return checkpoint
