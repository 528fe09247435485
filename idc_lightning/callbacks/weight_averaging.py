"""Weight averages (EMA, SWA) that are validated, checkpointed and tested in place of the raw weights.

Lightning's `WeightAveraging` averages every parameter and buffer. The classifier's own buffers (the loss's class
weights, the temperature fitted on validation) are set from data, not learned: the temperature changes at every
validation, and averaging would lag it behind, so these buffers are copied from the trained model before each
validation, checkpoint and the end of training. BatchNorm statistics, buffers of the layers, are averaged.
Lightning builds the averaged copy before the model moves to its device; it follows the model at fit start.

Lightning keeps its averaged copy after `fit`, so the `validate` and `test` that follow would load a checkpoint's
raw (not averaged) weights and swap the final average into validation; here the copy ends with `fit`, and every
later stage uses the checkpoint's `state_dict`, the average, as eval and predict do.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EMAWeightAveraging, WeightAveraging
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch.optim.swa_utils import get_swa_avg_fn

log = logging.getLogger(__name__)
SHARDING_STRATEGIES = (FSDPStrategy, ModelParallelStrategy, DeepSpeedStrategy)


class _AveragedLayersOnly(WeightAveraging):
    """`WeightAveraging` that keeps the LightningModule's own (non-layer) buffers out of the average."""

    def _copy_module_buffers(self, pl_module: L.LightningModule) -> None:
        if self._average_model is None:
            return
        averaged = self._average_model.module
        for name, buffer in pl_module.named_buffers(recurse=False):
            getattr(averaged, name).copy_(buffer)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Lightning warns whenever configure_model is overridden, for fear of sharded layers; the classifier's only
        # sets the memory format and compiles the backbone, so the warning stays only where a strategy shards.
        with warnings.catch_warnings():
            if not isinstance(trainer.strategy, SHARDING_STRATEGIES):
                warnings.filterwarnings("ignore", message=".*WeightAveraging callback with a model that overrides")
            super().setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._average_model is not None and self._device is None:
            self._average_model.to(pl_module.device)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._copy_module_buffers(pl_module)
        super().on_validation_epoch_start(trainer, pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._copy_module_buffers(pl_module)
        super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._copy_module_buffers(pl_module)
        super().on_train_end(trainer, pl_module)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._average_model = None

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if self._average_model is not None:  # resuming fit: restore the raw weights and the average
            super().on_load_checkpoint(trainer, pl_module, checkpoint)


class ModelEMA(_AveragedLayersOnly, EMAWeightAveraging):
    """An exponential moving average of the weights (`EMAWeightAveraging`), the model's own buffers kept out."""


class ModelSWA(_AveragedLayersOnly):
    """Stochastic weight averaging (Izmailov et al., 2018): the equal-weight mean of the weights after every optimizer
    step of epoch `start_epoch` (0-based) and later.

    Until then the average follows the raw weights step by step, so the first epochs validate and checkpoint what
    training without the callback would. BatchNorm statistics are averaged with the weights rather than re-estimated
    after training: re-estimating them on un-augmented patches did not help on validation (docs/results.md).
    """

    def __init__(self, start_epoch: int = 2, device: str | None = None, use_buffers: bool = True) -> None:
        if start_epoch < 0:
            raise ValueError(f"callbacks.swa.start_epoch={start_epoch}: use 0 or more (epochs count from 0)")
        # PyTorch's default average divides integer buffers (BatchNorm's num_batches_tracked) with a foreach kernel
        # that CUDA refuses; the per-tensor SWA function handles them.
        super().__init__(device=device, use_buffers=use_buffers, avg_fn=get_swa_avg_fn())
        self.start_epoch = start_epoch

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if trainer.max_epochs is not None and 0 <= trainer.max_epochs <= self.start_epoch:
            log.warning("callbacks.swa.start_epoch=%d but training ends after epoch %d (counted from 0): nothing is "
                        "averaged", self.start_epoch, trainer.max_epochs - 1)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: STEP_OUTPUT,
                           batch: Any, batch_idx: int) -> None:
        starting = trainer.current_epoch == self.start_epoch and batch_idx == 0
        if self._average_model is not None and (trainer.current_epoch < self.start_epoch or starting):
            # An average of nothing yet: the next update copies the raw weights instead of adding them to a mean.
            self._average_model.n_averaged.zero_()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
