"""The one decision rule of the project: a patch is called IDC when its probability is >= the threshold.

The threshold is chosen on validation with the same `>=` the ROC and precision-recall curves count with, and every
consumer (test metrics, patients.csv, confusion matrix, heatmaps, predict) calls `is_idc`, so one operating point
means one set of calls. torchmetrics' own thresholding uses `>`; it is never used for that reason.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torchmetrics.functional.classification import binary_precision_recall_curve, binary_roc

log = logging.getLogger(__name__)

THRESHOLD_METHODS = ("youden", "f1")
RULE = "prob >= threshold"


@dataclass(frozen=True)
class OperatingPoint:
    """A threshold and where it came from; saved in checkpoints and read by eval, predict and heatmaps."""

    threshold: float = 0.5
    method: str = "fixed"
    chosen_on: str = "none"
    rule: str = RULE
    # The fraction of the validation patches it was chosen on: below 1 when trainer.limit_val_batches cut them short.
    coverage: float = 1.0

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> OperatingPoint:
        return cls(**values)


def is_idc(probs: np.ndarray, threshold: float) -> np.ndarray:
    """The call at an operating point, as bool; NaN probabilities are never IDC."""
    return np.asarray(probs, dtype=np.float64) >= threshold


def choose_threshold(probs: np.ndarray, labels: np.ndarray, method: str = "youden", fallback: float = 0.5) -> float:
    """Operating point picked on validation and applied unchanged to test (never tuned on test).

    youden maximises sensitivity + specificity - 1 on the ROC curve; f1 maximises F1 on the PR curve. Both curves
    count `prob >= threshold` as positive, which `is_idc` repeats exactly.
    """
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"model.threshold_method={method!r}: use one of {', '.join(THRESHOLD_METHODS)}")
    labels = np.asarray(labels, dtype=np.int64)
    if not (labels.any() and (labels == 0).any()):
        log.warning("Validation has a single class: keeping the threshold %g", fallback)
        return fallback
    scores, targets = torch.tensor(np.asarray(probs, dtype=np.float32)), torch.tensor(labels)
    if method == "youden":
        fpr, tpr, thresholds = binary_roc(scores, targets)
        best = int(torch.argmax(tpr - fpr))
    else:
        precision, recall, thresholds = binary_precision_recall_curve(scores, targets)
        f1 = 2 * precision[:-1] * recall[:-1] / (precision[:-1] + recall[:-1]).clamp_min(1e-12)
        best = int(torch.argmax(f1))
    return float(thresholds[best].clamp(0.0, 1.0))
