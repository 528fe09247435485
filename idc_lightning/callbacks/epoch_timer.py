"""Seconds and patches/s of every training and validation epoch, logged like any metric and written to the run log.

What an epoch costs is the first thing a user asks of a new machine or a sweep's W&B dashboard, and the benchmarks
only extrapolate it from a steady state; this measures the real epoch, loader start-up and last batch included.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.data import extract_batch_size

log = logging.getLogger(__name__)


def _now(module: L.LightningModule) -> float:
    """Wall clock after the device has finished the work queued so far (CUDA runs asynchronously)."""
    if module.device.type == "cuda":
        torch.cuda.synchronize(module.device)
    return time.perf_counter()


class EpochTimer(L.Callback):
    """Logs `time/train_epoch_s`, `time/train_patches_per_s` and `time/val_epoch_s` (summed over ranks' patches).

    The training time runs from the epoch's start to its last training batch, so the validation that Lightning
    runs inside the epoch is not counted twice; the sanity check is not timed.
    """

    def __init__(self) -> None:
        self._train_started = 0.0
        self._last_batch_ended = 0.0
        self._patches = 0
        self._val_started = 0.0
        self._val_seconds = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._patches = 0
        self._val_seconds = 0.0
        self._train_started = self._last_batch_ended = _now(module)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._patches += extract_batch_size(batch)
        # Waiting for the device after every batch would stall its queue: only the epoch's last batch is synced.
        last = batch_idx + 1 >= trainer.num_training_batches
        self._last_batch_ended = _now(module) if last else time.perf_counter()

    def on_validation_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._val_started = _now(module)

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._val_seconds = _now(module) - self._val_started
        module.log("time/val_epoch_s", self._val_seconds, sync_dist=True, reduce_fx="max")

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        seconds = self._last_batch_ended - self._train_started
        if self._patches == 0 or seconds <= 0:
            return
        patches = self._patches * trainer.world_size
        module.log("time/train_epoch_s", seconds, sync_dist=True, reduce_fx="max")
        module.log("time/train_patches_per_s", patches / seconds, sync_dist=True, reduce_fx="min")
        if trainer.is_global_zero:
            log.info("Epoch %d: %s training patches in %.1f s (%s patches/s); validation %.1f s",
                     trainer.current_epoch, f"{patches:,}", seconds, f"{patches / seconds:,.0f}",
                     self._val_seconds)
