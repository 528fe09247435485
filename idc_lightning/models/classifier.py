"""IDCClassifier: a ResNet-18 patch classifier with weighted cross-entropy and patient-aware evaluation."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import BinaryAUROC

from idc_lightning import __version__
from idc_lightning.evaluation.calibration import expected_calibration_error, fit_temperature, logits_of
from idc_lightning.evaluation.metrics import binary_metrics, ranking_metrics
from idc_lightning.evaluation.operating_point import OperatingPoint, choose_threshold
from idc_lightning.evaluation.spatial_context import smooth_patient_probabilities
from idc_lightning.interfaces import PatchSource
from idc_lightning.models.backbone import build_resnet18
from idc_lightning.symmetry import dihedral

log = logging.getLogger(__name__)

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., Any]
# The checkpoint entry this model adds beside Lightning's own: what eval, predict and heatmaps must reuse.
RUN_KEY = "idc_lightning"
VAL_THR_METRICS = ("f1", "bal_acc", "sensitivity", "specificity")
CALIBRATIONS = (None, "none", "temperature")
# Fewer optimizer steps than this per epoch and BatchNorm statistics and Adam's moments barely settle.
MIN_STEPS_PER_EPOCH = 20
# Probabilities spanning less than this are one value: ranking metrics are meaningless there.
COLLAPSED_SPREAD = 1e-4


def _cuda_fast_path() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 7


class IDCClassifier(L.LightningModule):
    """Two logits with softmax cross-entropy, so per-class weights act exactly as in weighted CE and
    the head is a drop-in torchvision classifier; the IDC probability is softmax[:, 1].

    `IDCClassifier.load_from_checkpoint(path)` needs no argument and downloads nothing: the checkpoint records
    `pretrained=False` (its weights replace any initialisation) and the validation operating point.
    """

    def __init__(
        self,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        pretrained: bool | str = True,
        adapt_stem: bool = False,
        dropout: float = 0.2,
        class_weights: str | Sequence[float] | None = "inverse_freq",
        label_smoothing: float = 0.0,
        mixup_alpha: float = 0.0,
        freeze_backbone_epochs: int = 0,
        backbone_lr_scale: float = 1.0,
        threshold: float = 0.5,
        threshold_method: str = "youden",
        tta: bool = False,
        context_sigma: float = 0.0,
        calibrate: str | None = None,
        channels_last: bool | str = "auto",
        compile: bool | str = "auto",
    ) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"model.label_smoothing must be in [0, 1), got {label_smoothing}")
        if mixup_alpha < 0:
            raise ValueError(f"model.mixup_alpha must be >= 0 (0: off), got {mixup_alpha}")
        if calibrate not in CALIBRATIONS:
            raise ValueError(f"model.calibrate={calibrate!r}: use null or temperature")
        if context_sigma < 0:
            raise ValueError(f"model.context_sigma must be >= 0 patch widths (0: each patch alone), got "
                             f"{context_sigma}")
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.backbone = build_resnet18(pretrained, adapt_stem)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(512, 2))
        self.channels_last = _cuda_fast_path() if channels_last == "auto" else bool(channels_last)
        self.compile_backbone = _cuda_fast_path() if compile == "auto" else bool(compile)
        self.register_buffer("loss_weights", torch.ones(2))
        # Divides the logits of every probability the model reports; fitted on validation with calibrate=temperature.
        self.register_buffer("temperature", torch.ones(()))
        # Until validation chooses one (and in checkpoints after it): the fixed threshold.
        self.operating_point = OperatingPoint(threshold=threshold)
        self.train_auroc = BinaryAUROC(thresholds=200)
        self._outputs: dict[str, list[tuple[torch.Tensor, ...]]] = {"val": [], "test": []}
        self.predictions: dict[str, pd.DataFrame] = {}
        self.test_metrics: dict[str, float] = {}
        self._warned_partial: set[str] = set()

    @property
    def fixed_threshold(self) -> float:
        return float(self.hparams.threshold)

    def configure_model(self) -> None:
        if self.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        if self.compile_backbone and not hasattr(self.backbone, "_orig_mod"):
            self.backbone = torch.compile(self.backbone)

    def _patch_source(self) -> PatchSource:
        source = self.trainer.datamodule
        if not isinstance(source, PatchSource):
            raise TypeError(f"IDCClassifier needs a datamodule with split_frame, patches, truth and "
                            f"balancing_class_weights (interfaces.PatchSource); got {type(source).__name__}")
        return source

    def setup(self, stage: str) -> None:
        weights = self.hparams.class_weights
        if isinstance(weights, Sequence) and not isinstance(weights, str):
            self.loss_weights.copy_(torch.as_tensor(list(weights), dtype=torch.float32))
        elif weights == "inverse_freq":
            if stage == "fit":
                self.loss_weights.copy_(self._patch_source().balancing_class_weights())
        elif weights not in (None, "none"):
            raise ValueError(f"model.class_weights={weights!r}: use inverse_freq, none or [w0, w1]")
        if stage == "fit":
            log.info("Cross-entropy class weights: %s", self.loss_weights.tolist())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.head(self.backbone(images))

    def idc_probability(self, images: torch.Tensor) -> torch.Tensor:
        """P(IDC) at the fitted temperature; with TTA the mean over the 8 dihedral views (no orientation)."""
        if not self.hparams.tta:
            return (self(images) / self.temperature).softmax(dim=1)[:, 1]
        views = [(self(dihedral(images, k)) / self.temperature).softmax(dim=1)[:, 1] for k in range(8)]
        return torch.stack(views).mean(dim=0)

    def _backbone_frozen(self) -> bool:
        return self._trainer is not None and self.trainer.current_epoch < self.hparams.freeze_backbone_epochs

    def train(self, mode: bool = True) -> IDCClassifier:
        """Lightning switches to train mode at every epoch and after every validation: a frozen backbone stays in
        eval mode throughout, so BatchNorm's running statistics are frozen with its weights."""
        super().train(mode)
        if mode and self._backbone_frozen():
            self.backbone.eval()
        return self

    def on_train_start(self) -> None:
        steps = self.trainer.num_training_batches // self.trainer.accumulate_grad_batches
        if steps < MIN_STEPS_PER_EPOCH:
            log.warning(
                "Only %d optimizer steps per epoch (%s training batches, accumulate_grad_batches=%d): fewer than %d "
                "leaves BatchNorm and the optimizer unsettled and predictions may collapse to one value. Lower "
                "data.batch_size (or use more training patches); +experiment=small_data is the recipe for small "
                "cohorts.",
                steps, self.trainer.num_training_batches,
                self.trainer.accumulate_grad_batches, MIN_STEPS_PER_EPOCH)
        self.log("train/steps_per_epoch", float(steps), rank_zero_only=True)

    def on_train_epoch_start(self) -> None:
        self.train()

    def on_after_backward(self) -> None:
        # Gradients are still computed and all-reduced (DDP needs every parameter used); dropping them makes the
        # optimizer skip the backbone, weight decay included, without toggling requires_grad under DDP.
        if self._backbone_frozen():
            for parameter in self.backbone.parameters():
                parameter.grad = None

    def _training_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, weight=self.loss_weights, label_smoothing=self.hparams.label_smoothing)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch["image"], batch["label"]
        alpha = self.hparams.mixup_alpha
        if alpha > 0:
            # Mixup: each patch blended with another of the batch (often another patient's stain), its loss the same
            # blend of both labels' losses; train/auroc scores the larger part's label.
            weight = float(torch.distributions.Beta(alpha, alpha).sample())
            partner = torch.randperm(len(images), device=images.device)
            logits = self(weight * images + (1 - weight) * images[partner])
            loss = (weight * self._training_loss(logits, labels)
                    + (1 - weight) * self._training_loss(logits, labels[partner]))
            labels = labels if weight >= 0.5 else labels[partner]
        else:
            logits = self(images)
            loss = self._training_loss(logits, labels)
        self.train_auroc.update(logits.detach().float().softmax(dim=1)[:, 1], labels)
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

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        # Each patch alone: the spatial context needs the whole slide, so it is applied to the gathered predictions.
        return {"patch_prob": self.idc_probability(batch["image"]).float(), "index": batch["index"]}

    def _gather(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predictions of every rank, each patch once (DistributedSampler pads ranks with repeats)."""
        outputs = self._outputs[split]
        self._outputs[split] = []
        if not outputs:
            return np.empty(0, np.float32), np.empty(0, np.int64), np.empty(0, np.int64)
        probs, labels, index = (torch.cat(parts) for parts in zip(*outputs, strict=True))
        if self.trainer.world_size > 1:
            probs, labels, index = (self.all_gather(t).flatten() for t in (probs, labels, index))
        index, first = _first_occurrence(index)
        return probs[first].cpu().numpy(), labels[first].cpu().numpy(), index.cpu().numpy()

    def _predictions_frame(self, split: str, probs: np.ndarray, index: np.ndarray) -> pd.DataFrame:
        return self.predictions_of(self._patch_source().split_frame(split).iloc[index], probs)

    def predictions_of(self, rows: pd.DataFrame, patch_probs: np.ndarray) -> pd.DataFrame:
        """Manifest rows with `patch_prob` (each patch alone) and `prob` (in its slide context): `prob` is what
        every metric, the operating point, heatmaps and predictions use."""
        columns = ["patient_id", "x", "y", "label", "cache_index"]
        frame = rows[columns].assign(patch_prob=patch_probs).reset_index(drop=True)
        frame["prob"] = self.in_context(frame)
        return frame

    def in_context(self, predictions: pd.DataFrame) -> np.ndarray:
        """`predictions.patch_prob` averaged over each patch's neighbours on its patient's slide
        (model.context_sigma): the probability every metric, the operating point and the heatmaps use."""
        return smooth_patient_probabilities(predictions, self.hparams.context_sigma)

    def _calibrate(self, probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Refit the temperature on these validation probabilities; return them recalibrated.

        They were computed at the current temperature T: rescaling their logits by s gives the same as
        recomputing at T * s, so no second pass over the validation set is needed (exact without TTA).
        """
        logits = logits_of(probs)
        scale = fit_temperature(logits, labels)
        self.temperature.mul_(scale)
        return 1.0 / (1.0 + np.exp(-logits / scale))

    def _warn_if_collapsed(self, split: str, probs: np.ndarray) -> float:
        spread = float(probs.max() - probs.min())
        if spread < COLLAPSED_SPREAD:
            log.warning("%s probabilities collapsed to one value (%.4f for all %d patches): AUROC and the operating "
                        "point mean nothing; train longer with more optimizer steps per epoch (smaller "
                        "data.batch_size)", split, float(probs.mean()), len(probs))
        return float(spread < COLLAPSED_SPREAD)

    def _coverage(self, split: str, scored: int) -> float:
        """The fraction of the split's patches scored: below 1 when trainer.limit_{val,test}_batches (debug=limit,
        fast_dev_run) cut the epoch short, and then everything chosen or reported from it covers those patches only."""
        total = len(self._patch_source().split_frame(split))
        coverage = scored / total if total else 1.0
        if coverage < 1.0 and split not in self._warned_partial and not self.trainer.sanity_checking:
            self._warned_partial.add(split)
            limit = getattr(self.trainer, f"limit_{split}_batches")
            consequence = ("the checkpoint and the operating point are chosen on them" if split == "val" else
                           "results.json, patients.csv and the model card describe them only; python -m "
                           "idc_lightning.eval ckpt_path=<its checkpoint> scores every test patch")
            log.warning("Scored %d of the %d %s patches (%s batches: trainer.limit_%s_batches, overfit_batches or "
                        "fast_dev_run): %s; %s/coverage is %.3f", scored, total, split, limit, split, consequence,
                        split, coverage)
        return coverage

    def on_validation_epoch_end(self) -> None:
        probs, labels, index = self._gather("val")
        if len(probs) == 0:
            return
        if self.hparams.calibrate == "temperature" and not self.trainer.sanity_checking:
            probs = self._calibrate(probs, labels)
        predictions = self._predictions_frame("val", probs, index)
        patch_auroc = ranking_metrics(probs, labels)["auroc"]
        probs = predictions["prob"].to_numpy()
        # At the fixed threshold, like test/f1: the operating point chosen below is fitted to these very patches.
        metrics = binary_metrics(probs, labels, self.fixed_threshold)
        coverage = self._coverage("val", len(probs))
        if not self.trainer.sanity_checking:  # its few batches (often one patient, one class) choose nothing
            method = self.hparams.threshold_method
            threshold = choose_threshold(probs, labels, method, fallback=self.fixed_threshold)
            self.operating_point = OperatingPoint(threshold=threshold, method=method, chosen_on="val",
                                                  coverage=coverage)
        logged = {f"val/{k}": metrics[k] for k in ("auroc", "f1", "bal_acc", "auprc")}
        logged.update({"val/patch_auroc": patch_auroc, "val/threshold": self.operating_point.threshold,
                       "val/ece": expected_calibration_error(probs, labels),
                       "val/temperature": float(self.temperature),
                       "val/collapsed": self._warn_if_collapsed("val", probs), "val/coverage": coverage})
        self.log_dict(logged, sync_dist=True)
        self.predictions["val"] = predictions

    def on_test_epoch_end(self) -> None:
        probs, labels, index = self._gather("test")
        predictions = self._predictions_frame("test", probs, index)
        patch_auroc = ranking_metrics(probs, labels)["auroc"]
        probs = predictions["prob"].to_numpy()
        at_fixed = binary_metrics(probs, labels, self.fixed_threshold)
        at_val = binary_metrics(probs, labels, self.operating_point.threshold, ranking=False)
        self.test_metrics = {f"test/{k}": float(v) for k, v in at_fixed.items()}
        self.test_metrics.update({f"test/{k}@val_thr": float(at_val[k]) for k in VAL_THR_METRICS})
        self.test_metrics["test/val_threshold"] = self.operating_point.threshold
        self.test_metrics["test/patch_auroc"] = patch_auroc
        self.test_metrics["test/ece"] = expected_calibration_error(probs, labels)
        self.test_metrics["test/collapsed"] = self._warn_if_collapsed("test", probs) if len(probs) else 0.0
        self.test_metrics["test/coverage"] = self._coverage("test", len(probs))
        self.log_dict(self.test_metrics, sync_dist=True)
        self.predictions["test"] = predictions

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The weights are in the checkpoint: rebuilding the model from it must never fetch ImageNet weights.
        checkpoint["hyper_parameters"] = {**checkpoint.get("hyper_parameters", {}), "pretrained": False}
        checkpoint[RUN_KEY] = {
            "package_version": __version__,
            "initial_weights": str(self.hparams.pretrained),
            "operating_point": self.operating_point.to_dict(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if RUN_KEY in checkpoint:
            self.operating_point = OperatingPoint.from_dict(checkpoint[RUN_KEY]["operating_point"])

    def configure_optimizers(self) -> dict[str, Any]:
        if self.optimizer_factory is None:
            raise ValueError("IDCClassifier was built without an optimizer (e.g. by load_from_checkpoint): pass "
                             "optimizer=functools.partial(torch.optim.AdamW, lr=1e-3) to train it")
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
