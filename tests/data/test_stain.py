"""Colour deconvolution, HED jitter and Macenko normalisation."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from idc_lightning.data.stain import (
    MACENKO_REFERENCE,
    RGB_FROM_HED,
    estimate_stains,
    hed_jitter,
    hed_to_rgb,
    macenko_normalize,
    od_to_rgb,
    rgb_to_hed,
    rgb_to_od,
)

# Macenko's reference vectors are unit length only to 4 decimals.
REFERENCE_VECTORS = MACENKO_REFERENCE.stain_vectors / np.linalg.norm(
    MACENKO_REFERENCE.stain_vectors, axis=1, keepdims=True
)


def _rgb(shape: tuple[int, ...]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(shape, generator=generator) * (1 - 1 / 255) + 1 / 255


def _synthetic_patient(stain_vectors: np.ndarray, n: int = 64) -> np.ndarray:
    """uint8 [n,50,50,3] patches mixing two stains by Beer-Lambert, with some white background."""
    rng = np.random.default_rng(1)
    conc = rng.gamma(2.0, 0.35, size=(n, 50, 50, 2)) * (rng.random((n, 50, 50, 1)) > 0.2)
    rgb = 240 * np.exp(-conc @ stain_vectors) - 1
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def test_od_round_trip() -> None:
    rgb = _rgb((4, 3, 8, 8))
    torch.testing.assert_close(od_to_rgb(rgb_to_od(rgb)), rgb)


def test_hed_round_trip_in_both_layouts() -> None:
    rgb = _rgb((4, 3, 8, 8))
    hed = rgb_to_hed(rgb)
    torch.testing.assert_close(hed_to_rgb(hed), rgb, atol=1e-5, rtol=1e-5)
    channels_last = rgb.permute(0, 2, 3, 1)
    torch.testing.assert_close(rgb_to_hed(channels_last, dim=-1), hed.permute(0, 2, 3, 1))


def test_pure_haematoxylin_has_only_an_h_concentration() -> None:
    od = 0.8 * torch.tensor(RGB_FROM_HED[0], dtype=torch.float32)
    hed = rgb_to_hed(od_to_rgb(od).view(1, 3, 1, 1))
    torch.testing.assert_close(hed.flatten(), torch.tensor([0.8, 0.0, 0.0]), atol=1e-5, rtol=0)


def test_hed_jitter_is_an_affine_map_of_concentrations_per_image() -> None:
    rgb = _rgb((2, 3, 8, 8)) * 0.5 + 0.4  # mid-tones: the jitter below cannot clip
    alpha = torch.tensor([[1.0, 1.0, 1.0], [1.1, 0.9, 1.05]])
    beta = torch.tensor([[0.0, 0.0, 0.0], [0.02, -0.03, 0.01]])
    out = hed_jitter(rgb, alpha, beta)
    torch.testing.assert_close(out[0], rgb[0], atol=1e-5, rtol=0)
    expected = rgb_to_hed(rgb[1:]) * alpha[1].view(1, 3, 1, 1) + beta[1].view(1, 3, 1, 1)
    torch.testing.assert_close(rgb_to_hed(out[1:]), expected, atol=1e-4, rtol=0)


def test_estimate_stains_recovers_known_vectors() -> None:
    patches = _synthetic_patient(REFERENCE_VECTORS)
    estimate = estimate_stains(patches)
    assert estimate is not None
    cosine = np.sum(estimate.stain_vectors * REFERENCE_VECTORS, axis=1)
    assert np.all(cosine > 0.99), cosine


def test_achromatic_artefacts_are_not_taken_for_haematoxylin() -> None:
    # 6% of the pixels grey-black, as pen ink or a fold: they absorb every colour alike.
    patches = _synthetic_patient(REFERENCE_VECTORS)
    rng = np.random.default_rng(2)
    dark = rng.random(patches.shape[:3]) < 0.06
    patches[dark] = rng.integers(20, 90, size=(int(dark.sum()), 1))
    estimate = estimate_stains(patches)
    assert estimate is not None
    assert np.all(np.sum(estimate.stain_vectors * REFERENCE_VECTORS, axis=1) > 0.99)


def test_macenko_maps_other_stains_to_the_reference() -> None:
    ruifrok_he = RGB_FROM_HED[:2]
    patches = _synthetic_patient(ruifrok_he)
    out = macenko_normalize(patches)
    assert out.shape == patches.shape and out.dtype == np.uint8
    estimate = estimate_stains(out)
    assert estimate is not None
    assert np.all(np.sum(estimate.stain_vectors * REFERENCE_VECTORS, axis=1) > 0.99)
    np.testing.assert_allclose(estimate.max_concentrations, MACENKO_REFERENCE.max_concentrations, rtol=0.1)


def test_background_only_input_is_returned_unchanged() -> None:
    white = np.full((3, 50, 50, 3), 255, dtype=np.uint8)
    assert np.array_equal(macenko_normalize(white), white)
    nearly_white = white.copy()
    nearly_white[0, :4, :4] = (120, 60, 150)  # a speck of tissue is too little to estimate stains from
    assert np.array_equal(macenko_normalize(nearly_white), nearly_white)


def test_macenko_on_a_real_patient(real_data: Path) -> None:
    paths = sorted((real_data / "9035").glob("*/*.png"))
    decoded = [cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB) for path in paths]
    patches = np.stack([patch for patch in decoded if patch.shape == (50, 50, 3)])
    out = macenko_normalize(patches)
    estimate = estimate_stains(out)
    assert estimate is not None
    assert np.all(np.sum(estimate.stain_vectors * REFERENCE_VECTORS, axis=1) > 0.99)
    np.testing.assert_allclose(estimate.max_concentrations, MACENKO_REFERENCE.max_concentrations, rtol=0.1)
