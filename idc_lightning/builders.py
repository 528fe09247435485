"""One builder for train, eval and predict: config → datamodule, model, callbacks, loggers, trainer."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.syntax import Syntax
from rich.tree import Tree

from idc_lightning.data.datamodule import IDCDataModule
from idc_lightning.models.classifier import IDCClassifier
from idc_lightning.resolvers import register_resolvers

log = logging.getLogger(__name__)

# conf/hydra/default.yaml uses the project's resolvers: every entry point imports this module before Hydra composes.
register_resolvers()


@dataclass
class Run:
    datamodule: IDCDataModule
    model: IDCClassifier
    callbacks: list[Callback]
    loggers: list[Logger]
    trainer: L.Trainer


def instantiate_group(group: DictConfig | None) -> list:
    """Every `_target_` node of a callbacks/logger group; null entries switch one off."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if isinstance(node, DictConfig) and "_target_" in node]


def build_run(cfg: DictConfig, model: IDCClassifier | None = None, **data_settings: object) -> Run:
    """Train builds the model from cfg.model; eval passes the checkpoint's, with its data settings."""
    datamodule = instantiate(cfg.data, **data_settings)
    model = model if model is not None else instantiate(cfg.model)
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return Run(datamodule, model, callbacks, loggers, trainer)


def log_config(run: Run, cfg: DictConfig) -> None:
    """The resolved Hydra config goes to every logger, so dashboards can filter runs by any knob."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for logger in run.loggers:
        logger.log_hyperparams(resolved)


def print_config_tree(cfg: DictConfig) -> None:
    tree = Tree("config", guide_style="dim")
    for key, value in cfg.items():
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        tree.add(f"[bold]{key}[/bold]").add(Syntax(text, "yaml", background_color="default"))
    Console().print(tree)


def wandb_sync_hints(run: Run) -> list[str]:
    """Offline W&B runs need an explicit upload; say exactly how."""
    hints = []
    for logger in run.loggers:
        if isinstance(logger, WandbLogger) and logger._offline:
            hints.append(f"wandb sync {logger.experiment.dir.rsplit('/files', 1)[0]}")
    return hints
