"""IDCClassifier: a ResNet-18 patch classifier with weighted cross-entropy and patient-aware evaluation."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import BinaryAUROC

from idc_lightning.metrics import binary_metrics, choose_threshold
from idc_lightning.models.backbone import build_resnet18
from idc_lightning.symmetry import dihedral

log = logging.getLogger(__name__)

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., Any]


def _cuda_fast_path() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 7


class IDCClassifier(L.LightningModule):
    """Two logits with softmax cross-entropy, so per-class weights act exactly as in weighted CE and
    the head is a drop-in torchvision classifier; the IDC probability is softmax[:, 1]."""

    def __init__(
        self,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        pretrained: bool | str = True,
        adapt_stem: bool = False,
        dropout: float = 0.2,
        class_weights: str | Sequence[float] | None = "inverse_freq",
        freeze_backbone_epochs: int = 0,
        backbone_lr_scale: float = 1.0,
        threshold: float = 0.5,
        threshold_method: str = "youden",
        tta: bool = False,
        channels_last: bool | str = "auto",
        compile: bool | str = "auto",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.backbone = build_resnet18(pretrained, adapt_stem)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(512, 2))
        self.channels_last = _cuda_fast_path() if channels_last == "auto" else bool(channels_last)
        self.compile_backbone = _cuda_fast_path() if compile == "auto" else bool(compile)
        self.register_buffer("loss_weights", torch.ones(2))
        # Chosen on validation, saved in checkpoints so eval/predict reuse the operating point.
        self.register_buffer("val_threshold", torch.tensor(threshold))
        self.train_auroc = BinaryAUROC(thresholds=200)
        self._outputs: dict[str, list[tuple[torch.Tensor, ...]]] = {"val": [], "test": []}
        self.val_predictions: pd.DataFrame | None = None
        self.test_predictions: pd.DataFrame | None = None
        self.test_metrics: dict[str, float] = {}

    def configure_model(self) -> None:
        if self.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        if self.compile_backbone and not hasattr(self.backbone, "_orig_mod"):
            self.backbone = torch.compile(self.backbone)

    def setup(self, stage: str) -> None:
        weights = self.hparams.class_weights
        if weights == "inverse_freq" and stage == "fit":
            self.loss_weights.copy_(self.trainer.datamodule.class_weights)
        elif isinstance(weights, Sequence) and not isinstance(weights, str):
            self.loss_weights.copy_(torch.as_tensor(list(weights), dtype=torch.float32))
        elif weights not in (None, "none", "inverse_freq"):
            raise ValueError(f"model.class_weights={weights!r}: use inverse_freq, none or [w0, w1]")
        if stage == "fit":
            log.info("Cross-entropy class weights: %s", self.loss_weights.tolist())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.head(self.backbone(images))

    def idc_probability(self, images: torch.Tensor) -> torch.Tensor:
        """P(IDC); with TTA the mean over the 8 dihedral views, as histology has no orientation."""
        if not self.hparams.tta:
            return self(images).softmax(dim=1)[:, 1]
        return torch.stack([self(dihedral(images, k)).softmax(dim=1)[:, 1] for k in range(8)]).mean(dim=0)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["image"])
        loss = F.cross_entropy(logits, batch["label"], weight=self.loss_weights)
        self.train_auroc.update(logits.detach().float().softmax(dim=1)[:, 1], batch["label"])
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(logits))
        self.log("train/auroc", self.train_auroc, on_step=False, on_epoch=True, batch_size=len(logits))
        return loss

    def _evaluate_step(self, split: str, batch: dict[str, torch.Tensor]) -> None:
        probs = self.idc_probability(batch["image"]).float()
        # The training loss on what is evaluated (with TTA, the averaged probability): comparable with train/loss.
        log_probs = torch.stack([1 - probs, probs], dim=1).clamp_min(1e-7).log()
        loss = F.nll_loss(log_probs, batch["label"], weight=self.loss_weights)
        self.log(f"{split}/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=len(probs))
        self._outputs[split].append((probs, batch["label"], batch["index"]))

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate_step("val", batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate_step("test", batch)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.idc_probability(batch["image"])

    def _gather(self, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Predictions of every rank, each patch once (DistributedSampler pads ranks with repeats)."""
        outputs = self._outputs[split]
        self._outputs[split] = []
        if not outputs:
            empty = torch.empty(0, device=self.device)
            return empty, empty.long(), empty.long()
        probs, labels, index = (torch.cat(parts) for parts in zip(*outputs, strict=True))
        if self.trainer.world_size > 1:
            probs, labels, index = (self.all_gather(t).flatten() for t in (probs, labels, index))
        index, first = _first_occurrence(index)
        return probs[first].cpu(), labels[first].cpu(), index.cpu()

    def _predictions_frame(self, split: str, probs: torch.Tensor, index: torch.Tensor) -> pd.DataFrame:
        frame = self.trainer.datamodule.split_frame(split).iloc[index.numpy()]
        columns = ["patient_id", "x", "y", "label", "cache_index"]
        return frame[columns].assign(prob=probs.numpy()).reset_index(drop=True)

    def on_validation_epoch_end(self) -> None:
        probs, labels, index = self._gather("val")
        if len(probs) == 0:
            return
        # At the fixed model.threshold, like test/f1: the threshold chosen below is fitted to these very patches.
        metrics = binary_metrics(probs, labels, self.hparams.threshold, ranking=True)
        self.val_threshold.fill_(choose_threshold(probs, labels, self.hparams.threshold_method))
        logged = {f"val/{k}": metrics[k] for k in ("auroc", "f1", "bal_acc", "auprc")}
        logged["val/threshold"] = float(self.val_threshold)
        self.log_dict(logged, sync_dist=True)
        self.val_predictions = self._predictions_frame("val", probs, index)

    def on_test_epoch_end(self) -> None:
        probs, labels, index = self._gather("test")
        at_fixed = binary_metrics(probs, labels, self.hparams.threshold)
        at_val = binary_metrics(probs, labels, float(self.val_threshold), ranking=False)
        self.test_metrics = {f"test/{k}": float(v) for k, v in at_fixed.items()}
        self.test_metrics.update({f"test/{k}@val_thr": float(at_val[k])
                                  for k in ("f1", "bal_acc", "sensitivity", "specificity")})
        self.test_metrics["test/val_threshold"] = float(self.val_threshold)
        self.log_dict(self.test_metrics, sync_dist=True)
        self.test_predictions = self._predictions_frame("test", probs, index)

    def on_train_epoch_start(self) -> None:
        frozen = self.current_epoch < self.hparams.freeze_backbone_epochs
        for parameter in self.backbone.parameters():
            parameter.requires_grad_(not frozen)

    def configure_optimizers(self) -> dict[str, Any]:
        lr = self.optimizer_factory.keywords.get("lr", 1e-3)
        groups = [
            {"params": list(self.backbone.parameters()), "lr": lr * self.hparams.backbone_lr_scale},
            {"params": list(self.head.parameters()), "lr": lr},
        ]
        optimizer = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        scheduler = self.scheduler_factory(optimizer, total_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _first_occurrence(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique indices and the position of each one's first occurrence."""
    unique, inverse = torch.unique(index, return_inverse=True)
    positions = torch.arange(len(index), device=index.device)
    first = torch.full_like(unique, len(index)).scatter_reduce(0, inverse, positions, reduce="amin")
    return unique, first
