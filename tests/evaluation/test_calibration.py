"""Expected calibration error and temperature scaling: monotonic, so rankings and AUROC never change."""

from __future__ import annotations

import numpy as np
import pytest

from idc_lightning.evaluation.calibration import (
    expected_calibration_error,
    fit_temperature,
    logits_of,
    reliability_table,
)
from idc_lightning.evaluation.metrics import ranking_metrics


def _overconfident(n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels drawn from sigmoid(z), reported as sigmoid(3 z): a model three times too sure of itself."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2, n)
    labels = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(np.int64)
    return 1 / (1 + np.exp(-3 * z)), labels, z


def test_temperature_undoes_overconfidence_and_keeps_the_ranking() -> None:
    probs, labels, _ = _overconfident()
    temperature = fit_temperature(logits_of(probs), labels)
    assert temperature == pytest.approx(3.0, rel=0.15)
    calibrated = 1 / (1 + np.exp(-logits_of(probs) / temperature))
    assert expected_calibration_error(calibrated, labels) < 0.5 * expected_calibration_error(probs, labels)
    assert ranking_metrics(calibrated, labels)["auroc"] == pytest.approx(ranking_metrics(probs, labels)["auroc"])


def test_calibrated_probabilities_have_near_zero_ece() -> None:
    rng = np.random.default_rng(1)
    probs = rng.random(20000)
    labels = (rng.random(20000) < probs).astype(np.int64)
    assert expected_calibration_error(probs, labels) < 0.02
    assert fit_temperature(logits_of(probs), labels) == pytest.approx(1.0, abs=0.05)


def test_single_class_keeps_temperature_one_and_reliability_bins() -> None:
    assert fit_temperature(np.array([0.3, -1.0]), np.array([1, 1])) == 1.0
    table = reliability_table(np.array([0.05, 0.06, 0.95]), np.array([0, 1, 1]), n_bins=10)
    assert table["bin"].tolist() == [0, 9] and table["patches"].tolist() == [2, 1]
    assert table["idc_fraction"].tolist() == [0.5, 1.0]
