"""The albumentations pipelines of the CPU loader path."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import torch

from idc_lightning.data.augment_config import AugmentConfig
from idc_lightning.data.transforms import HEDJitter, eval_transform, train_transform


def _patch(height: int = 50, width: int = 50) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("image_size", [50, 224])
def test_train_and_eval_give_float_chw_tensors(image_size: int) -> None:
    for transform in (train_transform(AugmentConfig(hed_jitter=0.05), image_size), eval_transform(image_size)):
        out = transform(image=_patch())["image"]
        assert isinstance(out, torch.Tensor)
        assert out.shape == (3, image_size, image_size) and out.dtype == torch.float32


def test_native_size_keeps_the_patch_size() -> None:
    """No resize at 50 px: an edge patch keeps its own size (the cache, not the transform, pads it)."""
    assert not any(isinstance(t, A.Resize) for t in eval_transform(50).transforms)
    assert eval_transform(50)(image=_patch(50, 35))["image"].shape == (3, 50, 35)


def test_other_patch_sizes_are_resized_to_image_size() -> None:
    """64-px patches (data.patch_size=64) trained at image_size 50 are resized, as on the device path."""
    config = AugmentConfig(dihedral=False, brightness=0, contrast=0, saturation=0, hue=0)
    for transform in (train_transform(config, 50, patch_size=64), eval_transform(50, patch_size=64)):
        assert transform(image=_patch(64, 64))["image"].shape == (3, 50, 50)


def test_zero_strength_train_equals_eval() -> None:
    config = AugmentConfig(dihedral=False, brightness=0, contrast=0, saturation=0, hue=0)
    patch = _patch()
    assert torch.equal(train_transform(config, 50)(image=patch)["image"], eval_transform(50)(image=patch)["image"])


def test_eval_is_imagenet_normalisation() -> None:
    patch = _patch()
    expected = (patch / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    out = eval_transform(50)(image=patch)["image"]
    np.testing.assert_allclose(out.permute(1, 2, 0).numpy(), expected, atol=1e-5)


def test_brightness_factors_cover_the_configured_range() -> None:
    b = 0.2
    transform = train_transform(AugmentConfig(dihedral=False, brightness=b, contrast=0, saturation=0, hue=0), 50)
    patch = np.full((50, 50, 3), 100, dtype=np.uint8)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    factors = []
    for _ in range(400):
        out = transform(image=patch)["image"].permute(1, 2, 0).numpy()
        factors.append(((out * std + mean) * 255 / 100).mean())
    factors = np.array(factors)
    assert factors.min() >= 1 - b - 0.01 and factors.max() <= 1 + b + 0.01
    assert factors.std() == pytest.approx(2 * b / np.sqrt(12), rel=0.15)


def test_hed_jitter_at_zero_sigma_is_identity_up_to_rounding() -> None:
    patch = _patch()
    out = HEDJitter(sigma=0.0)(image=patch)["image"]
    assert out.dtype == np.uint8 and np.abs(out.astype(int) - patch).max() <= 1


def test_config_rejects_bad_strengths() -> None:
    with pytest.raises(ValueError, match="brightness"):
        AugmentConfig(brightness=-0.1)
    with pytest.raises(ValueError, match="hue"):
        AugmentConfig(hue=0.6)
