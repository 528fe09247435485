"""Patch- and patient-level metrics on complete prediction vectors (gathered from every rank first).

Each metric has one definition here. Undefined is NaN, never 0: F1 (and Dice, the same formula on masks) and
sensitivity need IDC in the truth, specificity needs non-IDC patches, AUROC/AUPRC and balanced accuracy need both.
Patient means average each metric over the patients where it is defined, so an IDC-free patient counts through its
specificity (its false positives), not through an F1 that is 0/0 when it is predicted perfectly.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from torchmetrics.functional.classification import binary_auroc, binary_average_precision

from idc_lightning.evaluation.operating_point import is_idc

PATIENT_COLUMNS = ["patient_id", "patches", "idc_pct", "predicted_idc_pct", "auroc", "f1", "sensitivity",
                   "specificity", "bal_acc"]
# Patient-level metrics whose mean over patients is reported as test/patient_mean_<name>.
PATIENT_MEAN_METRICS = ("auroc", "f1", "sensitivity", "specificity", "bal_acc")


def confusion_counts(called: np.ndarray, truth: np.ndarray) -> dict[str, int]:
    called, truth = np.asarray(called, dtype=bool), np.asarray(truth, dtype=bool)
    return {"tp": int((called & truth).sum()), "fp": int((called & ~truth).sum()),
            "tn": int((~called & ~truth).sum()), "fn": int((~called & truth).sum())}


def f1_score(tp: int, fp: int, fn: int) -> float:
    """2TP / (2TP + FP + FN), defined only when the truth holds IDC (Dice is the same on masks)."""
    return 2 * tp / (2 * tp + fp + fn) if tp + fn else math.nan


def rates(counts: dict[str, int]) -> dict[str, float]:
    """F1, sensitivity, specificity and balanced accuracy from confusion counts."""
    tp, fp, tn, fn = counts["tp"], counts["fp"], counts["tn"], counts["fn"]
    sensitivity = tp / (tp + fn) if tp + fn else math.nan
    specificity = tn / (tn + fp) if tn + fp else math.nan
    return {"f1": f1_score(tp, fp, fn), "sensitivity": sensitivity, "specificity": specificity,
            "bal_acc": (sensitivity + specificity) / 2}


def ranking_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """AUROC and AUPRC; NaN when only one class is present."""
    labels = np.asarray(labels, dtype=np.int64)
    if not (labels.any() and (labels == 0).any()):
        return {"auroc": math.nan, "auprc": math.nan}
    scores, targets = torch.tensor(np.asarray(probs, dtype=np.float32)), torch.tensor(labels)
    return {"auroc": float(binary_auroc(scores, targets)), "auprc": float(binary_average_precision(scores, targets))}


def binary_metrics(probs: np.ndarray, labels: np.ndarray, threshold: float, ranking: bool = True) -> dict[str, float]:
    """Confusion counts and rates at the operating point `threshold`, plus AUROC/AUPRC when `ranking`."""
    counts = confusion_counts(is_idc(probs, threshold), np.asarray(labels) == 1)
    metrics: dict[str, float] = {**rates(counts), **counts}
    if ranking:
        metrics.update(ranking_metrics(probs, labels))
    return metrics


def patient_scores(probs: np.ndarray, labels: np.ndarray | None, threshold: float) -> dict[str, float]:
    """One patient's row: patches, true and predicted IDC %, AUROC and the rates at `threshold`.

    Unlabelled patches (label NaN or None) count for the predicted IDC % only.
    """
    probs = np.asarray(probs, dtype=np.float64)
    scores = dict.fromkeys(PATIENT_COLUMNS[2:], math.nan)
    scores["patches"] = len(probs)
    scores["predicted_idc_pct"] = 100.0 * float(is_idc(probs, threshold).mean()) if len(probs) else math.nan
    labels = np.full(len(probs), np.nan) if labels is None else np.asarray(labels, dtype=np.float64)
    known = np.isfinite(labels)
    if known.any():
        truth = labels[known].astype(np.int64)
        scores["idc_pct"] = 100.0 * float(truth.mean())
        scores["auroc"] = ranking_metrics(probs[known], truth)["auroc"]
        scores.update(rates(confusion_counts(is_idc(probs[known], threshold), truth == 1)))
    return scores


def patient_table(predictions: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """One row per patient (sorted by id) with `patient_scores` at the operating point."""
    labels = predictions["label"] if "label" in predictions.columns else None
    rows = []
    for patient_id, frame in predictions.groupby("patient_id", sort=True):
        patient_labels = None if labels is None else pd.to_numeric(frame["label"]).to_numpy(np.float64, na_value=np.nan)
        rows.append({"patient_id": patient_id, **patient_scores(frame["prob"].to_numpy(), patient_labels, threshold)})
    return pd.DataFrame(rows, columns=PATIENT_COLUMNS)


def patient_means(table: pd.DataFrame) -> dict[str, float]:
    """Mean of each patient metric over the patients where it is defined (NaN rows skipped)."""
    return {name: float(table[name].mean(skipna=True)) if table[name].notna().any() else math.nan
            for name in PATIENT_MEAN_METRICS}
