"""python -m idc_lightning.eval ckpt_path=PATH [data.root=...]: test a checkpoint on patients it has never seen.

The model, its preprocessing, its operating point and (unless data.root is given) its data tree come from the
checkpoint; the test patients are every labelled patient under data.root that the checkpoint did not train or
validate on (or data.split_file's test rows). A sweep folder or a list of checkpoints is tested as their ensemble.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig

from idc_lightning.builders import build_run, log_config, print_config_tree
from idc_lightning.checkpoints import preprocessing_settings, read_model_checkpoint
from idc_lightning.evaluation.report import publish_test_report

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    L.seed_everything(cfg.seed, workers=True)
    checkpoint = read_model_checkpoint(cfg.ckpt_path)
    settings = preprocessing_settings(cfg.data, checkpoint, cfg.allow_preprocessing_change)
    root = cfg.data.root if cfg.data.root is not None else checkpoint.data_root
    run = build_run(cfg, checkpoint.model(), seen_patients=checkpoint.seen_patients, root=root, **settings)
    if run.trainer.is_global_zero and cfg.extras.print_config:
        print_config_tree(cfg)
    log_config(run, cfg)
    log.info("%s: operating point %s (%s on %s), trained on %d patients", checkpoint.path,
             f"{checkpoint.operating_point.threshold:.4f}", checkpoint.operating_point.method,
             checkpoint.operating_point.chosen_on, len(checkpoint.patients.get("train", [])))
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
