"""python -m idc_lightning.eval ckpt_path=PATH [data overrides]: re-evaluate a checkpoint on the test split."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig

from idc_lightning.builders import build_run, log_config, print_config_tree
from idc_lightning.checkpoints import load_weights
from idc_lightning.reports import publish_test_report

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    L.seed_everything(cfg.seed, workers=True)
    # The checkpoint carries every weight: never download ImageNet weights just to overwrite them.
    run = build_run(cfg, pretrained=False)
    load_weights(run.model, cfg.ckpt_path)
    if run.trainer.is_global_zero and cfg.extras.print_config:
        print_config_tree(cfg)
    log_config(run, cfg)
    run.trainer.test(run.model, datamodule=run.datamodule)
    metrics = dict(run.model.test_metrics)
    if run.trainer.is_global_zero:
        output_dir = Path(cfg.paths.output_dir)
        metrics = publish_test_report(run.trainer, run.model, metrics, output_dir)
        log.info("Evaluated %s; run folder: %s", cfg.ckpt_path, output_dir)
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
