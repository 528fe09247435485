"""callbacks=[default,ema] and [default,swa]: the averaged weights are validated, saved and tested; the model's own
buffers are not averaged."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.optim import swa_utils
from torch.utils.data import DataLoader

from idc_lightning.callbacks.weight_averaging import ModelSWA
from idc_lightning.eval import evaluate
from idc_lightning.train import train

EMA_RUN = ["callbacks=[default,ema]", "callbacks.ema.decay=0.5", "callbacks.heatmap=null",
           "callbacks.early_stopping=null", "model.calibrate=temperature", "trainer.max_epochs=2",
           "trainer.limit_train_batches=3"]


def test_checkpoint_holds_the_average_with_the_models_own_buffers(make_cfg, tmp_path: Path) -> None:
    train(make_cfg("train", EMA_RUN))
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    averaged, current = state["state_dict"], state["current_model_state"]
    conv = "backbone.conv1.weight"
    assert not torch.equal(averaged[conv], current[conv])
    # The temperature is refitted at every validation: copied from the trained model, never averaged.
    assert float(current["temperature"]) != 1.0
    assert torch.equal(averaged["temperature"], current["temperature"])
    # The patches tested after training are scored by the averaged weights that eval loads from the best checkpoint.
    best = next((tmp_path / "run" / "checkpoints").glob("epoch_*.ckpt"))
    evaluate(make_cfg("eval", [f"ckpt_path={best}"], output_dir=tmp_path / "eval"))
    keys = ["patient_id", "x", "y"]
    trained = pd.read_parquet(tmp_path / "run" / "predictions.parquet").sort_values(keys)
    evaluated = pd.read_parquet(tmp_path / "eval" / "predictions.parquet").sort_values(keys)
    assert np.allclose(trained["prob"].to_numpy(), evaluated["prob"].to_numpy(), atol=1e-6)


class _Descent(L.LightningModule):
    """w starts at 0 and falls by exactly 1 per optimizer step (loss w, SGD lr 1): its averages are known exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.w.sum() + 0 * batch.sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1.0)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.zeros(3, 1), batch_size=1)


@pytest.mark.parametrize(("start_epoch", "expected"), [(1, (-4 - 5 - 6) / 3), (0, -3.5), (5, -6.0)])
def test_swa_is_the_equal_mean_of_the_weights_from_its_start_epoch(start_epoch: int, expected: float) -> None:
    # 2 epochs of 3 steps: w after each step is -1 … -6. Before start_epoch the average follows the raw weights; it
    # never starts with start_epoch 5 (w itself).
    model = _Descent()
    trainer = L.Trainer(max_epochs=2, callbacks=[ModelSWA(start_epoch=start_epoch)], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model)
    assert float(model.w.detach()) == pytest.approx(expected)


@pytest.mark.parametrize(("start_epoch", "stopped_after", "expected"), [(0, 1, -3.5), (1, 2, -6.5)])
def test_swa_resumed_after_a_stop_gives_the_uninterrupted_average(tmp_path: Path, start_epoch: int,
                                                                   stopped_after: int, expected: float) -> None:
    # A pre-empted job (SLURM, SIGTERM) resumes from last.ckpt: the raw weights and the running average, with its
    # count, come back, so the next epoch extends the mean instead of starting a new one (w: -1, -2, ... per step).
    def fit(max_epochs: int, ckpt_path: Path | None) -> _Descent:
        model = _Descent()
        last = ModelCheckpoint(dirpath=tmp_path, filename="last", enable_version_counter=False)
        trainer = L.Trainer(max_epochs=max_epochs, callbacks=[ModelSWA(start_epoch=start_epoch), last],
                            logger=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(model, ckpt_path=ckpt_path)
        return model

    fit(stopped_after, None)
    assert float(fit(stopped_after + 1, tmp_path / "last.ckpt").w.detach()) == pytest.approx(expected)


def test_swa_checkpoints_the_raw_weights_before_its_start_epoch(make_cfg, tmp_path: Path,
                                                                recwarn: pytest.WarningsRecorder) -> None:
    train(make_cfg("train", ["callbacks=[default,swa]", "callbacks.swa.start_epoch=1", "callbacks.heatmap=null",
                             "callbacks.early_stopping=null", "callbacks.model_checkpoint.save_top_k=-1",
                             "trainer.max_epochs=2", "trainer.limit_train_batches=3", "test=false"]))
    checkpoints = tmp_path / "run" / "checkpoints"
    conv = "backbone.conv1.weight"
    first = torch.load(next(checkpoints.glob("epoch_000*.ckpt")), weights_only=True)
    assert torch.equal(first["state_dict"][conv], first["current_model_state"][conv])
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert not torch.equal(last["state_dict"][conv], last["current_model_state"][conv])
    assert torch.equal(last["state_dict"]["loss_weights"], last["current_model_state"]["loss_weights"])
    # Lightning's sharding warning for models with configure_model does not apply to the classifier's.
    assert not [w for w in recwarn if "overrides the configure_model" in str(w.message)]


def test_swa_averages_batchnorm_counters_on_the_cuda_code_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # PyTorch averages with foreach kernels on CUDA devices, whose integer division fails on num_batches_tracked;
    # declaring the CPU such a device runs that path here.
    monkeypatch.setattr(swa_utils, "_get_foreach_kernels_supported_devices", lambda: ["cpu", "cuda"])
    swa = ModelSWA(start_epoch=0)
    network = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    swa._average_model = swa_utils.AveragedModel(network, use_buffers=True, **swa._kwargs)
    running_means = []
    for _ in range(3):
        network(torch.randn(4, 2))
        running_means.append(network[1].running_mean.clone())
        swa._average_model.update_parameters(network)
    averaged = swa._average_model.module[1]
    assert torch.allclose(averaged.running_mean, torch.stack(running_means).mean(0))
    assert averaged.num_batches_tracked.dtype == torch.long
