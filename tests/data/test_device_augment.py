"""BatchAugment must be a batched twin of the albumentations pipeline: same steps, same distributions."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from idc_lightning.data import device_augment
from idc_lightning.data.augment_config import AugmentConfig
from idc_lightning.data.device_augment import BatchAugment
from idc_lightning.data.transforms import eval_transform, train_transform
from idc_lightning.preprocessing import IMAGENET_MEAN, IMAGENET_STD
from idc_lightning.symmetry import dihedral

NO_JITTER = {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0}


def _denormalize(images: torch.Tensor) -> torch.Tensor:
    """Back to [0, 1] RGB, to state jitter bounds in pixel terms."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return images * std + mean


def _asymmetric_patch(size: int = 50) -> torch.Tensor:
    """Random uint8 patch [H, W, 3]: no D4 element maps it to itself."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=generator)


@pytest.fixture(scope="module")
def real_patches(real_data: Path) -> np.ndarray:
    """Full-size patches of one real patient (uint8 [N,50,50,3] RGB)."""
    paths = sorted((real_data / "9035").glob("*/*.png"))
    patches = [cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB) for path in paths]
    return np.stack([patch for patch in patches if patch.shape == (50, 50, 3)])


def test_dihedral_gives_eight_distinct_images() -> None:
    x = _asymmetric_patch().permute(2, 0, 1)
    images = [dihedral(x, k) for k in range(8)]
    assert all(not torch.equal(images[i], images[j]) for i in range(8) for j in range(i))


def test_dihedral_composes_like_d4() -> None:
    x = _asymmetric_patch().permute(2, 0, 1)
    elements = [dihedral(x, k) for k in range(8)]
    assert torch.equal(elements[0], x)
    for j in range(8):
        # closed under composition, and every element has an inverse
        assert all(any(torch.equal(dihedral(elements[j], k), e) for e in elements) for k in range(8))
        assert any(torch.equal(dihedral(elements[j], k), x) for k in range(8))
    with pytest.raises(ValueError, match="0..7"):
        dihedral(x, 8)


def test_train_dihedral_output_is_one_of_the_eight() -> None:
    torch.manual_seed(0)
    batch = _asymmetric_patch().expand(512, -1, -1, -1)
    augment = BatchAugment(AugmentConfig(dihedral=True, **NO_JITTER))
    reference = augment(batch[:1], train=False)[0]
    candidates = torch.stack([dihedral(reference, k) for k in range(8)])
    out = augment(batch, train=True)
    matches = (out[:, None] == candidates[None]).flatten(2).all(dim=2)
    assert torch.all(matches.sum(dim=1) == 1)
    counts = matches.sum(dim=0)
    assert torch.all(counts > 30), f"D4 elements not uniform: {counts.tolist()}"


def test_brightness_scales_each_image_by_one_factor_in_range() -> None:
    torch.manual_seed(1)
    b = 0.2
    # at most 127: even x1.2 cannot clip, so ratios show the raw factor
    images = torch.randint(1, 128, (256, 50, 50, 3), dtype=torch.uint8)
    out = BatchAugment(AugmentConfig(dihedral=False, **{**NO_JITTER, "brightness": b}))(images, train=True)
    ratio = _denormalize(out) / (images.permute(0, 3, 1, 2).float() / 255)
    assert ratio.min() >= 1 - b - 1e-4 and ratio.max() <= 1 + b + 1e-4
    per_image = ratio.flatten(1)
    assert torch.allclose(per_image.min(1).values, per_image.max(1).values, atol=1e-4)
    assert per_image[:, 0].min() < 0.85 and per_image[:, 0].max() > 1.15


def test_hue_shift_keeps_hsv_value_and_minimum() -> None:
    torch.manual_seed(2)
    images = torch.randint(0, 256, (64, 50, 50, 3), dtype=torch.uint8)
    out = _denormalize(BatchAugment(AugmentConfig(dihedral=False, **{**NO_JITTER, "hue": 0.5}))(images, True))
    x = images.permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(out.amax(1), x.amax(1), atol=1e-5)
    assert torch.allclose(out.amin(1), x.amin(1), atol=1e-5)
    assert not torch.allclose(out, x, atol=1e-2)


def test_strong_jitter_stays_finite_and_in_range() -> None:
    torch.manual_seed(3)
    images = torch.randint(0, 256, (64, 50, 50, 3), dtype=torch.uint8)
    config = AugmentConfig(brightness=0.9, contrast=0.9, saturation=0.9, hue=0.5, hed_jitter=0.3)
    out = _denormalize(BatchAugment(config)(images, train=True))
    assert torch.isfinite(out).all()
    assert out.min() >= -1e-5 and out.max() <= 1 + 1e-5


def test_zero_strength_train_equals_eval() -> None:
    images = _asymmetric_patch().expand(4, -1, -1, -1)
    augment = BatchAugment(AugmentConfig(dihedral=False, **NO_JITTER))
    assert torch.equal(augment(images, train=True), augment(images, train=False))


def test_same_seed_same_batch() -> None:
    images = _asymmetric_patch().expand(8, -1, -1, -1)
    augment = BatchAugment(AugmentConfig(hed_jitter=0.05))
    torch.manual_seed(4)
    first = augment(images, train=True)
    torch.manual_seed(4)
    assert torch.equal(first, augment(images, train=True))


def test_resize_and_memory_format() -> None:
    images = _asymmetric_patch().expand(2, -1, -1, -1)
    out = BatchAugment(AugmentConfig(), image_size=224, channels_last=True)(images, train=True)
    assert out.shape == (2, 3, 224, 224) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_gpu_strategy_gives_the_same_batch_as_the_cpu_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU, steps that only some images take run on those images; on a GPU on all, then torch.where picks.
    Same random draws, so the same batch: checked on CPU, where both can run."""
    images = torch.randint(0, 256, (64, 50, 50, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    augment = BatchAugment(AugmentConfig(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.2, hed_jitter=0.05))
    torch.manual_seed(6)
    cpu = augment(images, train=True)
    monkeypatch.setattr(device_augment, "_where_chosen", device_augment._on_whole_batch)
    torch.manual_seed(6)
    assert torch.equal(augment(images, train=True), cpu)


def test_rejects_float_or_channels_first_input() -> None:
    augment = BatchAugment(AugmentConfig())
    with pytest.raises(ValueError, match="uint8"):
        augment(torch.zeros(2, 50, 50, 3), train=False)
    with pytest.raises(ValueError, match="uint8"):
        augment(torch.zeros(2, 3, 50, 50, dtype=torch.uint8), train=False)


def test_eval_matches_cpu_eval_transform(real_patches: np.ndarray) -> None:
    cpu = torch.stack([eval_transform(50)(image=patch)["image"] for patch in real_patches])
    device = BatchAugment(AugmentConfig(), image_size=50)(torch.from_numpy(real_patches), train=False)
    torch.testing.assert_close(device, cpu, atol=1e-5, rtol=0)


def test_resized_eval_close_to_cpu_eval_transform(real_patches: np.ndarray) -> None:
    patches = real_patches[:32]
    cpu = torch.stack([eval_transform(224)(image=patch)["image"] for patch in patches])
    device = BatchAugment(AugmentConfig(), image_size=224)(torch.from_numpy(patches), train=False)
    # OpenCV resizes uint8 and rounds; torch resizes floats: small differences only
    assert (device - cpu).abs().mean() < 0.01


def test_jitter_distribution_matches_cpu_path(real_patches: np.ndarray) -> None:
    """Per-image mean and contrast of augmented patches: same spread whichever path made them.

    Not equal: OpenCV truncates to uint8 after each of the four adjustments, which biases the CPU path
    down by up to ~0.002 per step.
    """
    config = AugmentConfig(dihedral=False, brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1)
    patches = real_patches[np.arange(2048) % len(real_patches)]
    cpu_transform = train_transform(config, 50)
    cpu_transform.set_random_seed(0)
    cpu = torch.stack([cpu_transform(image=patch)["image"] for patch in patches])
    torch.manual_seed(0)
    device = BatchAugment(config)(torch.from_numpy(patches), train=True)
    for stat in (lambda x: x.mean(dim=(2, 3)), lambda x: x.std(dim=(2, 3))):
        cpu_stat, device_stat = stat(_denormalize(cpu)), stat(_denormalize(device))
        torch.testing.assert_close(device_stat.mean(0), cpu_stat.mean(0), atol=0.01, rtol=0)
        torch.testing.assert_close(device_stat.std(0), cpu_stat.std(0), atol=0, rtol=0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batch_needs_no_host_sync() -> None:
    """A sync here would stall the GPU queue every step (e.g. a blocking copy of a constant)."""
    images = _asymmetric_patch().expand(64, -1, -1, -1).cuda()
    augment = BatchAugment(AugmentConfig(hed_jitter=0.05), image_size=64)
    augment(images, train=True)  # the first batch moves constants to the device, once
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = augment(images, train=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.device == images.device and torch.isfinite(out).all()
