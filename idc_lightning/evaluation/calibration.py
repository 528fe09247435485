"""Whether a probability of 0.8 means 80%: expected calibration error and temperature scaling.

Pathologists read heatmap colours as probabilities. Weighted cross-entropy and early stopping on AUROC leave them
miscalibrated; a temperature fitted on validation (Guo et al., 2017) rescales the logit without changing the
ranking, so AUROC and the calls at the re-chosen operating point are unchanged while ECE drops.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from torchmetrics.functional.classification import binary_calibration_error

ECE_BINS = 15
# Probabilities are clipped this far from 0 and 1 before taking logits (float32 softmax saturates).
_EPS = 1e-6


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Mean |accuracy - confidence| over equal-width probability bins, weighted by their patch counts."""
    if len(probs) == 0:
        return math.nan
    scores = torch.tensor(np.asarray(probs, dtype=np.float32))
    return float(binary_calibration_error(scores, torch.tensor(np.asarray(labels, dtype=np.int64)), n_bins=n_bins))


def reliability_table(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> pd.DataFrame:
    """Per probability bin: patches, mean predicted probability and observed IDC fraction (empty bins dropped)."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    bins = np.minimum((probs * n_bins).astype(np.int64), n_bins - 1)
    frame = pd.DataFrame({"bin": bins, "prob": probs, "idc": labels})
    table = frame.groupby("bin").agg(patches=("prob", "size"), mean_prob=("prob", "mean"), idc_fraction=("idc", "mean"))
    return table.reset_index()


def logits_of(probs: np.ndarray) -> np.ndarray:
    """The logit difference z with sigmoid(z) = p (two-class softmax), clipped away from infinity."""
    probs = np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(probs / (1 - probs))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 minimising the negative log-likelihood of sigmoid(logits / T); 1.0 for a single-class set."""
    labels = np.asarray(labels, dtype=np.float64)
    if len(labels) == 0 or labels.min() == labels.max():
        return 1.0
    # Called from Lightning's validation loop, which runs under inference mode: this small fit needs autograd.
    with torch.inference_mode(False), torch.enable_grad():
        z = torch.tensor(np.asarray(logits, dtype=np.float64))
        y = torch.tensor(labels)
        log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

        def nll() -> torch.Tensor:
            optimizer.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z / log_t.exp(), y)
            loss.backward()
            return loss

        optimizer.step(nll)
        return float(log_t.detach().exp().clamp(0.05, 20.0))
