"""Batched augmentation on the batch's device (`augment_on: device`).

Same steps and parameter distributions as `transforms.train_transform`, but per-image parameters are drawn
as tensors and applied to the whole batch at once, so a GPU does in one pass what CPU workers do per patch.
Random numbers come from torch's default generators on the batch's device, so `seed_everything` fixes them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from idc_lightning.data.stain import hed_jitter
from idc_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD, PATCH_SIZE, AugmentConfig


def dihedral(images: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th (0..7) element of D4 on the last two dims: k % 4 quarter turns, then a mirror if k >= 4."""
    if not 0 <= k < 8:
        raise ValueError(f"dihedral index must be in 0..7, got {k}")
    rotated = torch.rot90(images, k % 4, dims=(-2, -1))
    return rotated.flip(-1) if k >= 4 else rotated


def _per_image(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def _uniform(shape: int | tuple[int, ...], low: float, high: float, device: torch.device) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, device=device)


def _random_dihedral(images: torch.Tensor) -> torch.Tensor:
    """One of the 8 D4 elements per image, uniformly: three independent fair bits (transpose, flip, flip)
    name each element exactly once."""
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"dihedral augmentation needs square patches, got {tuple(images.shape[-2:])}")
    bits = torch.rand(images.shape[0], 3, device=images.device) < 0.5
    images = torch.where(_per_image(bits[:, 0]), images.transpose(-2, -1), images)
    images = torch.where(_per_image(bits[:, 1]), images.flip(-2), images)
    return torch.where(_per_image(bits[:, 2]), images.flip(-1), images)


def _gray(images: torch.Tensor) -> torch.Tensor:
    """ITU-R BT.601 luma, as OpenCV's RGB2GRAY in albumentations' contrast and saturation."""
    red, green, blue = images.unbind(1)
    return (0.299 * red + 0.587 * green + 0.114 * blue).unsqueeze(1)


def _shift_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate HSV hue by `shift` turns per image, keeping HSV saturation and value (as OpenCV's HSV)."""
    red, green, blue = images.unbind(1)
    value = images.amax(1)
    chroma = value - images.amin(1)
    # Grey pixels (chroma 0) have no hue; any finite value works since chroma scales it away below.
    inv_chroma = 1 / chroma.clamp_min(1e-12)
    sextant = torch.where(
        value == red,
        (green - blue) * inv_chroma,
        torch.where(value == green, 2 + (blue - red) * inv_chroma, 4 + (red - green) * inv_chroma),
    )
    sextant = sextant.unsqueeze(1) + 6 * shift.view(-1, 1, 1, 1)
    offsets = torch.arange(5, 0, -2, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    k = torch.remainder(offsets + sextant, 6)
    return value.unsqueeze(1) - chroma.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1)


def _color_jitter(images: torch.Tensor, augment: AugmentConfig) -> torch.Tensor:
    """torchvision/albumentations ColorJitter with per-image factors and a per-image random order.

    Brightness, contrast and saturation are all `f * x + (1 - f) * target` (target 0, the mean grey level,
    the grey image), so each of the 4 steps is one blend in which every image uses the adjustment its own
    permutation puts there; images whose step is the hue shift blend with f = 1, an exact no-op.
    """
    batch, device = images.shape[0], images.device
    brightness = _uniform(batch, max(0.0, 1 - augment.brightness), 1 + augment.brightness, device)
    contrast = _uniform(batch, max(0.0, 1 - augment.contrast), 1 + augment.contrast, device)
    saturation = _uniform(batch, max(0.0, 1 - augment.saturation), 1 + augment.saturation, device)
    hue = _uniform(batch, -augment.hue, augment.hue, device)
    order = torch.rand(batch, 4, device=device).argsort(dim=1)
    for step in range(4):
        op = _per_image(order[:, step])
        factor = torch.where(op == 0, _per_image(brightness), 1.0)
        factor = torch.where(op == 1, _per_image(contrast), factor)
        factor = torch.where(op == 2, _per_image(saturation), factor)
        gray = _gray(images)
        target = torch.where(op == 1, gray.mean(dim=(1, 2, 3), keepdim=True), 0.0)
        target = torch.where(op == 2, gray, target)
        images = (factor * images + (1 - factor) * target).clamp(0, 1)
        if augment.hue > 0:
            images = torch.where(op == 3, _shift_hue(images, hue), images)
    return images


def _channel_constants(values: Sequence[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, 3, 1, 1)


class BatchAugment(torch.nn.Module):
    """uint8 [B,H,W,3] batch on any device -> normalised float32 [B,3,S,S], augmented when `train`."""

    def __init__(
        self,
        augment: AugmentConfig,
        image_size: int = PATCH_SIZE,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.augment = augment
        self.image_size = image_size
        self.channels_last = channels_last
        self.register_buffer("mean", _channel_constants(mean), persistent=False)
        self.register_buffer("std", _channel_constants(std), persistent=False)

    def forward(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        if images.dim() != 4 or images.shape[-1] != 3 or images.dtype != torch.uint8:
            raise ValueError(f"expected uint8 [B,H,W,3] patches, got {images.dtype} {tuple(images.shape)}")
        x = images.permute(0, 3, 1, 2)
        if train and self.augment.dihedral:
            x = _random_dihedral(x)  # a pure pixel permutation: cheapest on uint8
        x = x.float().div_(255)
        if train:
            x = self._jitter(x)
        size = (self.image_size, self.image_size)
        if x.shape[-2:] != size:
            # Jitter first at patch size: upsampling 50 -> 224 would make it 20x dearer.
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        if self.mean.device != x.device:
            self.to(x.device)  # once: a blocking host-to-GPU copy per batch would stall the GPU queue
        x = (x - self.mean) / self.std
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=memory_format)

    def _jitter(self, x: torch.Tensor) -> torch.Tensor:
        augment = self.augment
        if augment.hed_jitter > 0:
            sigma, shape = augment.hed_jitter, (x.shape[0], 3)
            alpha = _uniform(shape, 1 - sigma, 1 + sigma, x.device)
            x = hed_jitter(x, alpha, _uniform(shape, -sigma, sigma, x.device))
        if augment.color_jitter:
            x = _color_jitter(x, augment)
        return x
