"""callbacks.epoch_timer: every epoch's seconds and patches/s reach the logger and the run log; validation, at the
epoch's end or in its middle, is never counted as training."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from idc_lightning.callbacks.epoch_timer import EpochTimer
from idc_lightning.train import train

VALIDATION_SLEEP_S = 0.3


class _SlowValidation(L.LightningModule):
    """Training steps take microseconds; each validation run sleeps VALIDATION_SLEEP_S."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.layer(batch).sum()

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        time.sleep(VALIDATION_SLEEP_S)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.zeros(20, 1), batch_size=5)  # 4 batches of 5 patches

    def val_dataloader(self) -> DataLoader:
        return DataLoader(torch.zeros(1, 1), batch_size=1)


def test_validations_inside_the_epoch_are_not_training_time(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="idc_lightning.callbacks.epoch_timer")
    # Validation after the 2nd and the 4th batch: 2 x 0.3 s of sleep inside the training epoch.
    trainer = L.Trainer(max_epochs=1, val_check_interval=2, callbacks=[EpochTimer()], num_sanity_val_steps=1,
                        logger=CSVLogger(tmp_path), enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(_SlowValidation())
    logged = trainer.logged_metrics
    assert float(logged["time/train_epoch_s"]) < VALIDATION_SLEEP_S
    assert float(logged["time/train_patches_per_s"]) == pytest.approx(20 / float(logged["time/train_epoch_s"]))
    metrics = pd.read_csv(Path(trainer.logger.log_dir) / "metrics.csv")
    val_runs = metrics["time/val_epoch_s"].dropna()
    assert len(val_runs) == 2 and (val_runs >= VALIDATION_SLEEP_S).all()  # the sanity check is not a run
    (line,) = [record.getMessage() for record in caplog.records if record.name.endswith("epoch_timer")]
    assert line.startswith("Epoch 0: 20 training patches in ")
    assert float(line.rsplit("validation ", 1)[1].split(" s")[0]) >= 2 * VALIDATION_SLEEP_S


def test_each_epoch_of_a_real_run_logs_its_time_and_throughput(make_cfg, tmp_path: Path) -> None:
    train(make_cfg("train", ["trainer.max_epochs=2", "trainer.limit_train_batches=3", "data.batch_size=16",
                             "callbacks.heatmap=null"]))
    metrics = pd.read_csv(tmp_path / "run" / "csv" / "metrics.csv")
    timed = metrics.dropna(subset=["time/train_epoch_s"])
    assert timed["epoch"].tolist() == [0, 1] and (timed["time/train_epoch_s"] > 0).all()
    # 3 batches of 16 patches each epoch.
    assert timed["time/train_patches_per_s"].to_numpy() == pytest.approx(48 / timed["time/train_epoch_s"].to_numpy())
    # Both training epochs, then train's re-validation of the best checkpoint after fit.
    assert metrics.dropna(subset=["time/val_epoch_s"])["epoch"].tolist() == [0, 1, 2]
