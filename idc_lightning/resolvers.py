"""OmegaConf resolvers for defaults that depend on the machine (GPU precision, W&B mode, sweep group) or on the run
folder being resumed."""

from __future__ import annotations

import netrc
import os
from pathlib import Path

import torch
from omegaconf import OmegaConf

from idc_lightning import resume


def auto_precision() -> str:
    """bf16-mixed where the GPU does bf16, full precision elsewhere (CPU autocast is slower here)."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def wandb_offline() -> bool:
    """Offline unless W&B can log in without a prompt: CI and clusters have no stdin."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled"):
        return True
    if os.environ.get("WANDB_API_KEY"):
        return False
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is None
    except (FileNotFoundError, netrc.NetrcParseError):
        return True


def sweep_group(mode: object, sweep_dir: str) -> str | None:
    """Jobs of one multirun share a W&B group named after the sweep folder; single runs get none."""
    return Path(sweep_dir).name if "MULTIRUN" in str(mode) else None


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("idc.auto_precision", auto_precision, replace=True)
    OmegaConf.register_new_resolver("idc.wandb_offline", wandb_offline, replace=True)
    OmegaConf.register_new_resolver("idc.sweep_group", sweep_group, replace=True)
    OmegaConf.register_new_resolver("idc.run_dir", resume.run_dir, replace=True)
    OmegaConf.register_new_resolver("idc.hydra_subdir", resume.hydra_subdir, replace=True)
    OmegaConf.register_new_resolver("idc.wandb_run_id", resume.wandb_run_id, replace=True)
