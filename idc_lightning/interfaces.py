"""The typed seams between the Lightning classes: what the model, the callbacks and the reports read of each other.

IDCDataModule implements PatchSource and IDCClassifier implements EvaluatedModel; the other side depends only on
these protocols, so neither imports the other and a test can stand in for either.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np
import pandas as pd
import torch

from idc_lightning.evaluation.operating_point import OperatingPoint

# (patient_id, that patient's prediction rows) -> per-row true IDC, or None where no ground truth exists.
TruthSource = Callable[[str, pd.DataFrame], "np.ndarray | None"]


@runtime_checkable
class PatchSource(Protocol):
    """Patches split by patient, with the rows that map predictions back to patient, x, y and label."""

    truth: TruthSource | None

    def split_frame(self, split: str) -> pd.DataFrame:
        """Rows (patient_id, x, y, label, cache_index, ...) of one split, in loader order."""

    def patches(self, cache_index: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] pixels of the given cache rows."""

    def balancing_class_weights(self) -> torch.Tensor:
        """Cross-entropy weights [w0, w1] that undo the class imbalance the training loader still has."""


@runtime_checkable
class EvaluatedModel(Protocol):
    """Gathered predictions of the last validation/test epoch and the operating point they are called at."""

    predictions: dict[str, pd.DataFrame]
    operating_point: OperatingPoint
    fixed_threshold: float
