from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from idc_lightning.evaluation.metrics import ranking_metrics
from idc_lightning.evaluation.spatial_context import smooth_on_grid, smooth_patient_probabilities


def test_sigma_zero_leaves_every_probability_alone() -> None:
    probs = np.array([0.1, 0.9, 0.4], np.float32)
    assert np.array_equal(smooth_on_grid(np.array([1, 51, 101]), np.array([1, 1, 1]), probs, 0.0), probs)


def test_a_patch_surrounded_by_idc_is_pulled_up_by_gaussian_weights() -> None:
    ys, xs = np.mgrid[0:3, 0:3] * 50 + 1
    probs = np.full(9, 0.9, np.float32)
    probs[4] = 0.1  # the centre
    smoothed = smooth_on_grid(xs.ravel(), ys.ravel(), probs, sigma=1.0)
    side, corner = math.exp(-0.5), math.exp(-1.0)
    expected = (0.1 + 0.9 * (4 * side + 4 * corner)) / (1 + 4 * side + 4 * corner)
    assert smoothed[4] == pytest.approx(expected, rel=1e-5)
    # Every patch: the weighted mean over the patches present, weights exp(-d^2 / 2 sigma^2) at d patch widths;
    # the glass around the 3x3 block carries no weight, so an edge patch is not read as benign.
    distance2 = ((xs.ravel()[:, None] - xs.ravel()) ** 2 + (ys.ravel()[:, None] - ys.ravel()) ** 2) / 50**2
    weights = np.exp(-distance2 / 2)
    assert smoothed == pytest.approx(weights @ probs / weights.sum(axis=1), rel=1e-5)


def test_a_patch_without_neighbours_keeps_its_probability() -> None:
    smoothed = smooth_on_grid(np.array([1, 1001]), np.array([1, 1001]), np.array([0.2, 0.8]), sigma=1.5)
    assert smoothed == pytest.approx([0.2, 0.8])


def test_sigma_counts_patch_widths_whatever_the_grid_step() -> None:
    probs = np.array([0.0, 1.0], np.float32)
    kaggle = smooth_on_grid(np.array([0, 50]), np.array([0, 0]), probs, sigma=1.0, tile=50, step=50)
    stride_25 = smooth_on_grid(np.array([0, 50]), np.array([0, 0]), probs, sigma=1.0, tile=50, step=25)
    assert stride_25 == pytest.approx(kaggle, rel=1e-5)
    assert kaggle[0] == pytest.approx(math.exp(-0.5) / (1 + math.exp(-0.5)), rel=1e-5)


@pytest.mark.parametrize(("sigma", "step"), [(2.0, 50), (1.5, 25)])
def test_wide_kernels_keep_exact_zeros_and_stay_within_zero_and_one(sigma: float, step: int) -> None:
    ys, xs = np.mgrid[0:40, 0:40]
    probs = (xs >= 20).ravel().astype(np.float32)
    smoothed = smooth_on_grid(xs.ravel() * step, ys.ravel() * step, probs, sigma, tile=50, step=step)
    reach = int(np.ceil(3 * sigma * 50 / step))  # the kernel's radius in cells
    assert smoothed.min() >= 0 and smoothed.max() <= 1
    assert (smoothed[(xs < 20 - reach).ravel()] == 0).all() and (smoothed[(xs >= 20 + reach).ravel()] == 1).all()


def test_missing_probabilities_stay_missing_and_are_not_spread() -> None:
    smoothed = smooth_on_grid(np.array([0, 50, 100]), np.array([0, 0, 0]), np.array([0.2, np.nan, 0.2]), sigma=1.0)
    assert np.isnan(smoothed[1]) and smoothed[[0, 2]] == pytest.approx([0.2, 0.2])


def test_patients_never_borrow_each_others_neighbours() -> None:
    predictions = pd.DataFrame({"patient_id": ["a", "a", "b", "b"], "x": [1, 51, 1, 51], "y": [1, 1, 1, 1],
                                "patch_prob": [0.1, 0.1, 0.9, 0.9]})
    assert smooth_patient_probabilities(predictions, 2.0) == pytest.approx([0.1, 0.1, 0.9, 0.9])


def test_context_ranks_a_noisy_tumour_region_better_than_patches_alone() -> None:
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:30, 0:30]
    labels = ((xs - 15) ** 2 + (ys - 15) ** 2 < 64).ravel().astype(int)
    probs = np.clip(0.3 + 0.4 * labels + rng.normal(0, 0.25, labels.size), 0, 1)
    predictions = pd.DataFrame({"patient_id": "p", "x": xs.ravel() * 50 + 1, "y": ys.ravel() * 50 + 1,
                                "patch_prob": probs})
    alone = ranking_metrics(probs, labels)["auroc"]
    in_context = ranking_metrics(smooth_patient_probabilities(predictions, 1.5), labels)["auroc"]
    assert alone < 0.9 < in_context


def test_negative_sigma_is_refused() -> None:
    with pytest.raises(ValueError, match=">= 0 patch widths"):
        smooth_on_grid(np.array([1]), np.array([1]), np.array([0.5]), sigma=-1.0)
