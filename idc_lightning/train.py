"""python -m idc_lightning.train [+experiment=NAME] [overrides]: fit, test the best checkpoint, write the run.

python -m idc_lightning.train resume=<run folder> [key=value ...]: continue that run in place.
python -m idc_lightning.train tune=lr: find a learning rate (lr_finder.png) instead of training.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig

from idc_lightning.builders import build_run, log_config, print_config_tree, wandb_sync_hints
from idc_lightning.callbacks.heatmap_writer import HeatmapCallback
from idc_lightning.checkpoints import read_checkpoint
from idc_lightning.evaluation.report import publish_test_report, write_results
from idc_lightning.model_card import write_model_card
from idc_lightning.resume import resumed_config
from idc_lightning.tune import find_lr

log = logging.getLogger(__name__)


def _resume_path(cfg: DictConfig) -> str | None:
    """`last` means this run folder's checkpoints/last.ckpt (rerun with the same hydra.run.dir)."""
    if cfg.ckpt_path in (None, "last"):
        return cfg.ckpt_path
    path = Path(cfg.ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={path} does not exist; give a checkpoint file or ckpt_path=last")
    return str(path)


def train(cfg: DictConfig) -> dict[str, float]:
    if cfg.get("resume"):
        cfg = resumed_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    run = build_run(cfg)
    trainer = run.trainer
    if trainer.is_global_zero and cfg.extras.print_config:
        print_config_tree(cfg)
    log_config(run, cfg)
    if cfg.get("tune"):
        return find_lr(run, cfg.tune, Path(cfg.paths.output_dir))
    metrics: dict[str, float] = {}
    checkpoint = trainer.checkpoint_callback
    if cfg.test:
        run.datamodule.require_test_split()
    trainer.fit(run.model, datamodule=run.datamodule, ckpt_path=_resume_path(cfg))
    best = checkpoint.best_model_path if checkpoint is not None else ""
    if best:
        # Report (and return to sweepers) the validation metrics of the checkpoint that is tested, not of the last
        # epoch.
        trainer.validate(run.model, datamodule=run.datamodule, ckpt_path=best, weights_only=True)
    metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")})
    if cfg.test:
        if not best:
            log.warning("No best checkpoint (fast_dev_run or checkpointing off): testing the current weights")
        trainer.test(run.model, datamodule=run.datamodule, ckpt_path=best or None, weights_only=True)
        metrics.update(run.model.test_metrics)
    output_dir = Path(cfg.paths.output_dir)
    if trainer.is_global_zero:
        if cfg.test:
            metrics = publish_test_report(trainer, run.model, metrics, output_dir)
        else:
            write_results(output_dir / "results.json", metrics)
        if best:
            write_model_card(output_dir / "MODEL_CARD.md", read_checkpoint(best), metrics)
        log.info("Run folder: %s", output_dir)
        for folder in {c.test_folder for c in run.callbacks if isinstance(c, HeatmapCallback) and c.test_folder}:
            log.info("Heatmaps: %s", folder)
        for hint in wandb_sync_hints(run):
            log.info("W&B ran offline; upload with: %s", hint)
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    return metrics.get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
