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
    """Logs `time/train_epoch_s`, `time/train_patches_per_s` (all ranks' patches over the slowest rank's seconds)
    and `time/val_epoch_s` (each validation run).

    Training time is summed over the stretches between validations, so a validation inside the epoch (at its end,
    or several with `val_check_interval`) is never counted as training, nor are the checkpoints saved after it.
    The device is synchronised only at those boundaries, never per batch.
    """

    def __init__(self) -> None:
        self._stretch_started: float | None = None
        self._train_seconds = 0.0
        self._val_seconds = 0.0
        self._val_started = 0.0
        self._patches = 0

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._train_seconds = self._val_seconds = 0.0
        self._patches = 0
        self._stretch_started = _now(module)

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._stretch_started is None:  # resumed mid-epoch (no on_train_epoch_start), or after a validation
            self._stretch_started = _now(module)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._patches += extract_batch_size(batch)

    def on_validation_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._val_started = _now(module)
        self._close_stretch(self._val_started)

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        seconds = _now(module) - self._val_started
        self._val_seconds += seconds
        module.log("time/val_epoch_s", seconds, sync_dist=True, reduce_fx="max")

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._close_stretch(_now(module))
        strategy = trainer.strategy
        patches = int(strategy.reduce(torch.tensor(self._patches, device=module.device), reduce_op="sum"))
        seconds = float(strategy.reduce(torch.tensor(self._train_seconds, device=module.device), reduce_op="max"))
        if patches == 0 or seconds <= 0:
            return
        module.log("time/train_epoch_s", seconds)
        module.log("time/train_patches_per_s", patches / seconds)
        if trainer.is_global_zero:
            log.info("Epoch %d: %s training patches in %.1f s (%s patches/s); validation %.1f s",
                     trainer.current_epoch, f"{patches:,}", seconds, f"{patches / seconds:,.0f}",
                     self._val_seconds)

    def _close_stretch(self, now: float) -> None:
        if self._stretch_started is not None:
            self._train_seconds += now - self._stretch_started
            self._stretch_started = None
