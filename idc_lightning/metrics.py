"""Patch- and patient-level metrics on complete prediction vectors (gathered from every rank first)."""

from __future__ import annotations

import logging
import math

import pandas as pd
import torch
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    binary_precision_recall_curve,
    binary_roc,
    binary_stat_scores,
)

log = logging.getLogger(__name__)


def has_both_classes(labels: torch.Tensor) -> bool:
    return bool((labels == 1).any() and (labels == 0).any())


def binary_metrics(probs: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5,
                   ranking: bool = True) -> dict[str, float]:
    """AUROC, AUPRC, F1, balanced accuracy, sensitivity, specificity and the confusion counts.

    Ranking metrics are NaN (not 0, not a crash) when only one class is present: they are undefined there.
    """
    labels = labels.long()
    tp, fp, tn, fn, _ = (int(v) for v in binary_stat_scores(probs, labels, threshold=threshold))
    sensitivity = tp / (tp + fn) if tp + fn else math.nan
    specificity = tn / (tn + fp) if tn + fp else math.nan
    metrics = {
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan,
        "bal_acc": (sensitivity + specificity) / 2,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
    }
    if ranking:
        both = has_both_classes(labels)
        metrics["auroc"] = float(binary_auroc(probs, labels)) if both else math.nan
        metrics["auprc"] = float(binary_average_precision(probs, labels)) if both else math.nan
    return metrics


def choose_threshold(probs: torch.Tensor, labels: torch.Tensor, method: str = "youden") -> float:
    """Operating point picked on validation and applied unchanged to test (never tuned on test)."""
    labels = labels.long()
    if not has_both_classes(labels):
        log.warning("Validation has a single class: keeping the 0.5 threshold")
        return 0.5
    if method == "youden":
        fpr, tpr, thresholds = binary_roc(probs, labels)
        best = int(torch.argmax(tpr - fpr))
    elif method == "f1":
        precision, recall, thresholds = binary_precision_recall_curve(probs, labels)
        f1 = 2 * precision[:-1] * recall[:-1] / (precision[:-1] + recall[:-1]).clamp_min(1e-12)
        best = int(torch.argmax(f1))
    else:
        raise ValueError(f"model.threshold_method={method!r}: use youden or f1")
    return float(thresholds[best].clamp(0.0, 1.0))


def patient_metrics(predictions: pd.DataFrame, threshold: float = 0.5) -> pd.DataFrame:
    """One row per patient: patches, IDC %, AUROC (where both classes exist) and F1."""
    rows = []
    for patient_id, frame in predictions.groupby("patient_id", sort=True):
        # pandas 3 hands out read-only views (copy-on-write); torch wants writable memory.
        probs = torch.tensor(frame["prob"].to_numpy())
        labels = torch.tensor(frame["label"].to_numpy())
        scores = binary_metrics(probs, labels, threshold)
        rows.append({"patient_id": patient_id, "patches": len(frame), "idc_pct": 100.0 * float(labels.float().mean()),
                     "auroc": scores["auroc"], "f1": scores["f1"], "bal_acc": scores["bal_acc"]})
    return pd.DataFrame(rows, columns=["patient_id", "patches", "idc_pct", "auroc", "f1", "bal_acc"])
