"""One definition per metric, NaN where undefined, and one operating point applied with one comparison."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from idc_lightning.evaluation.metrics import binary_metrics, patient_means, patient_scores, patient_table
from idc_lightning.evaluation.operating_point import choose_threshold, is_idc


@pytest.mark.parametrize("method", ["youden", "f1"])
def test_separable_validation_threshold_keeps_every_call(method: str) -> None:
    """Separable probabilities (IDC exactly 1.0, as a saturated softmax gives) choose threshold 1.0; applied with
    the same >= it was chosen with, F1 at that threshold equals F1 at 0.5 (torchmetrics' > would give 0)."""
    probs = np.array([0.0, 0.0, 0.1, 1.0, 1.0])
    labels = np.array([0, 0, 0, 1, 1])
    threshold = choose_threshold(probs, labels, method)
    assert threshold == 1.0
    at_val, fixed = binary_metrics(probs, labels, threshold), binary_metrics(probs, labels, 0.5)
    assert at_val["f1"] == fixed["f1"] == 1.0 and at_val["bal_acc"] == fixed["bal_acc"] == 1.0


def test_is_idc_counts_the_threshold_itself_as_idc() -> None:
    np.testing.assert_array_equal(is_idc(np.array([0.49, 0.5, 0.51, np.nan]), 0.5), [False, True, True, False])


def test_single_class_validation_keeps_the_fallback_threshold() -> None:
    assert choose_threshold(np.array([0.2, 0.9]), np.array([0, 0]), fallback=0.4) == 0.4
    with pytest.raises(ValueError, match="youden"):
        choose_threshold(np.array([0.2, 0.9]), np.array([0, 1]), "nope")


def test_binary_metrics_counts_and_undefined_ranking() -> None:
    metrics = binary_metrics(np.array([0.9, 0.6, 0.4, 0.1]), np.array([1, 0, 1, 0]), 0.5)
    assert (metrics["tp"], metrics["fp"], metrics["tn"], metrics["fn"]) == (1, 1, 1, 1)
    assert metrics["f1"] == 0.5 and metrics["sensitivity"] == 0.5 and metrics["auroc"] == 0.75
    benign = binary_metrics(np.array([0.1, 0.7]), np.array([0, 0]), 0.5)
    assert math.isnan(benign["auroc"]) and math.isnan(benign["f1"]) and benign["specificity"] == 0.5


def test_patient_scores_are_defined_for_idc_free_patients() -> None:
    benign = patient_scores(np.array([0.1, 0.7]), np.array([0, 0]), 0.5)
    assert math.isnan(benign["f1"]) and math.isnan(benign["sensitivity"]) and math.isnan(benign["auroc"])
    assert benign["specificity"] == 0.5 and benign["predicted_idc_pct"] == 50.0 and benign["idc_pct"] == 0.0
    unlabelled = patient_scores(np.array([0.7]), None, 0.5)
    assert math.isnan(unlabelled["idc_pct"]) and unlabelled["predicted_idc_pct"] == 100.0


def test_patient_means_are_not_biased_against_idc_free_patients() -> None:
    """A perfect IDC-free patient and one with a false positive both enter the mean specificity, and neither
    enters the mean F1 (which they would as NaN-dropped and 0 under a naive F1)."""
    predictions = pd.DataFrame({
        "patient_id": ["a", "a", "b", "b", "c", "c"],
        "label": [1, 0, 0, 0, 0, 0],
        "prob": [0.9, 0.1, 0.1, 0.2, 0.8, 0.1],
    })
    table = patient_table(predictions, 0.5)
    assert table["patient_id"].tolist() == ["a", "b", "c"]
    means = patient_means(table)
    assert means["f1"] == 1.0
    assert means["specificity"] == pytest.approx((1.0 + 1.0 + 0.5) / 3)
    assert means["sensitivity"] == 1.0
