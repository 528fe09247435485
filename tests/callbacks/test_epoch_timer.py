"""callbacks.epoch_timer: every epoch's seconds and patches/s reach the logger and the run log."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest

from idc_lightning.train import train


def test_each_epoch_logs_its_time_and_throughput(make_cfg, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="idc_lightning.callbacks.epoch_timer")
    train(make_cfg("train", ["trainer.max_epochs=2", "trainer.limit_train_batches=3", "data.batch_size=16",
                             "callbacks.heatmap=null"]))
    metrics = pd.read_csv(tmp_path / "run" / "csv" / "metrics.csv")
    timed = metrics.dropna(subset=["time/train_epoch_s"])
    assert timed["epoch"].tolist() == [0, 1]
    assert (timed["time/train_epoch_s"] > 0).all()
    # 3 batches of 16 patches each epoch: the rate is exactly those 48 patches over the logged seconds.
    assert timed["time/train_patches_per_s"].to_numpy() == pytest.approx(48 / timed["time/train_epoch_s"].to_numpy())
    validated = metrics.dropna(subset=["time/val_epoch_s"])
    # Both training epochs, then train's re-validation of the best checkpoint after fit.
    assert validated["epoch"].tolist() == [0, 1, 2]
    lines = [record.getMessage() for record in caplog.records if record.name.endswith("epoch_timer")]
    assert len(lines) == 2 and lines[0].startswith("Epoch 0: 48 training patches in ")
