"""Batched augmentation on the batch's device (`augment_on: device`).

Same steps and parameter distributions as `transforms.train_transform`, but per-image parameters are drawn
as tensors and applied to the whole batch at once, so a GPU does in one pass what CPU workers do per patch.
Random numbers come from torch's default generators on the batch's device, so `seed_everything` fixes them.

On CPU a step that only some images take (one D4 element, the hue shift) is computed for those images only;
on a GPU it is computed for all and `torch.where` picks, because indexing by a mask needs its count on the
host, a sync that would stall the GPU queue every batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F

from idc_lightning.data.augment_config import AugmentConfig
from idc_lightning.data.stain import hed_jitter
from idc_lightning.preprocessing import IMAGENET_MEAN, IMAGENET_STD, LUMA, PATCH_SIZE

# ITU-R BT.601 luma, as OpenCV's RGB2GRAY in albumentations' contrast and saturation.


def _per_image(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def _uniform(shape: int | tuple[int, ...], low: float, high: float, device: torch.device) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, device=device)


_Transform = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


def _on_chosen_only(images: torch.Tensor, chosen: torch.Tensor, transform: _Transform) -> torch.Tensor:
    """The CPU way: `transform` gets a copy of the chosen images and their `index` (to pick per-image
    parameters); its result is written back into `images` in place."""
    index = chosen.nonzero().squeeze(1)
    if len(index):
        images.index_copy_(0, index, transform(images.index_select(0, index), index))
    return images


def _on_whole_batch(images: torch.Tensor, chosen: torch.Tensor, transform: _Transform) -> torch.Tensor:
    """The GPU way: `transform` gets a copy of the whole batch (index None) and torch.where picks."""
    return torch.where(_per_image(chosen), transform(images.clone(), None), images)


def _where_chosen(images: torch.Tensor, chosen: torch.Tensor, transform: _Transform) -> torch.Tensor:
    """`transform(x, index)` for the images where `chosen` ([B] bool), the others unchanged; `x` is the
    transform's own copy to overwrite."""
    if images.device.type == "cpu":
        return _on_chosen_only(images, chosen, transform)
    return _on_whole_batch(images, chosen, transform)


# The 8 elements of D4 as (flipped dims, then transpose?): each costs at most one copy, where composing
# `symmetry.dihedral`'s quarter turns and mirror costs up to two.
_D4 = [(flips, transpose) for transpose in (False, True) for flips in ((), (-1,), (-2,), (-2, -1))]


def _d4_element(images: torch.Tensor, _: object, flips: tuple[int, ...], transpose: bool) -> torch.Tensor:
    images = images.flip(flips) if flips else images
    return images.transpose(-2, -1) if transpose else images


def _random_dihedral(images: torch.Tensor) -> torch.Tensor:
    """One of the 8 D4 elements per image, uniformly; in place on CPU."""
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"dihedral augmentation needs square patches, got {tuple(images.shape[-2:])}")
    element = torch.randint(len(_D4), (images.shape[0],), device=images.device)
    for k, (flips, transpose) in enumerate(_D4[1:], start=1):  # element 0 is the identity
        images = _where_chosen(images, element == k, partial(_d4_element, flips=flips, transpose=transpose))
    return images


def _shift_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate HSV hue by `shift` turns per image, keeping HSV saturation and value (as OpenCV's HSV).

    Overwrites `images` with the result. Branch-free arithmetic in preallocated planes: on CPU torch.where,
    remainder, bool tensors and fresh allocations are each 5-50x slower than an in-place arithmetic pass.
    """
    red, green, blue = images.unbind(1)
    planes = images.new_empty((7, *red.shape))
    value, minimum, chroma, sextant, red_side, green_side, scratch = planes.unbind(0)
    torch.amax(images, 1, out=value)
    torch.amin(images, 1, out=minimum)
    torch.sub(value, minimum, out=chroma)
    # 1.0 where the channel is the maximum, red winning ties, then green (a float `out` skips a bool tensor).
    torch.eq(value, red, out=red_side)
    torch.eq(value, green, out=green_side).addcmul_(green_side, red_side, value=-1)
    # Hue in sextants: (g - b) / C where red is the maximum, 2 + (b - r) / C green, 4 + (r - g) / C blue.
    torch.sub(red, green, out=sextant)
    sextant.addcmul_(red_side, torch.sub(green, blue, out=scratch).sub_(sextant))
    sextant.addcmul_(green_side, torch.sub(blue, red, out=scratch).sub_(red).add_(green))
    # Grey pixels (chroma 0) have no hue; any finite value works since chroma scales it away below.
    sextant.div_(torch.clamp_min(chroma, 1e-12, out=scratch))
    sextant.add_((6 * shift + 4).view(-1, 1, 1)).sub_(red_side, alpha=4).sub_(green_side, alpha=2)
    for channel, offset in enumerate((5.0, 3.0, 1.0)):
        k = torch.add(sextant, offset, out=scratch)
        k.sub_(torch.mul(k, 1 / 6, out=red_side).floor_(), alpha=6)  # k mod 6
        # HSV -> RGB: value - chroma * clamp(min(k, 4 - k), 0, 1), i.e. minimum + chroma * clamp(|k - 2| - 1, 0, 1)
        torch.addcmul(minimum, chroma, k.sub_(2).abs_().sub_(1).clamp_(0, 1), out=images[:, channel])
    return images


def _blend(images: torch.Tensor, factor: torch.Tensor, grey_weight: torch.Tensor, mean_weight: torch.Tensor,
           grey: torch.Tensor) -> torch.Tensor:
    """In place, per image: x * factor + grey_weight * grey(x) + mean_weight * mean(grey(x)), clamped to [0, 1].

    Brightness, contrast and saturation are each `f * x + (1 - f) * target` with target 0, the mean grey
    level or the grey image, so one pass serves every image whatever its adjustment at this step. factor,
    grey_weight, mean_weight: [B]; grey: [B,1,H,W] scratch.
    """
    red, green, blue = images.unbind(1)
    torch.mul(red, LUMA[0], out=grey[:, 0]).add_(green, alpha=LUMA[1]).add_(blue, alpha=LUMA[2])
    offset = mean_weight * grey.mean(dim=(1, 2, 3))
    grey.mul_(_per_image(grey_weight)).add_(_per_image(offset))
    return torch.addcmul(grey, images, _per_image(factor), out=images).clamp_(0, 1)


def _color_jitter(images: torch.Tensor, augment: AugmentConfig) -> torch.Tensor:
    """torchvision/albumentations ColorJitter with per-image factors and a per-image random order, in place.

    Each of the 4 steps is one blend in which every image uses the adjustment its own permutation puts there
    (hue images get factor 1, an exact no-op), then the hue shift of the images whose step it is.
    """
    batch, device = images.shape[0], images.device
    brightness = _uniform(batch, max(0.0, 1 - augment.brightness), 1 + augment.brightness, device)
    contrast = _uniform(batch, max(0.0, 1 - augment.contrast), 1 + augment.contrast, device)
    saturation = _uniform(batch, max(0.0, 1 - augment.saturation), 1 + augment.saturation, device)
    hue = _uniform(batch, -augment.hue, augment.hue, device)
    order = torch.rand(batch, 4, device=device).argsort(dim=1)  # [B, step] -> 0..3: b, c, s, hue
    # Per image and step: the blend factor, and the weights of the grey image and of its mean.
    factors = torch.stack([brightness, contrast, saturation, torch.ones_like(brightness)], dim=1).gather(1, order)
    rest = 1 - factors
    grey_weights, mean_weights = rest * (order == 2), rest * (order == 1)
    blend = any((augment.brightness, augment.contrast, augment.saturation))
    grey = images.new_empty((batch, 1, *images.shape[2:])) if blend else None
    for step in range(4):
        if blend:
            images = _blend(images, factors[:, step], grey_weights[:, step], mean_weights[:, step], grey)
        if augment.hue > 0:
            images = _where_chosen(images, order[:, step] == 3,
                                   lambda x, index: _shift_hue(x, hue if index is None else hue[index]))
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
        # (x - mean) / std as one multiply-add by 1 / std (albumentations' Normalize multiplies too)
        self.register_buffer("scale", 1 / self.std, persistent=False)
        self.register_buffer("shift", -self.mean / self.std, persistent=False)

    def forward(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        if images.dim() != 4 or images.shape[-1] != 3 or images.dtype != torch.uint8:
            raise ValueError(f"expected uint8 [B,H,W,3] patches, got {images.dtype} {tuple(images.shape)}")
        if self.mean.device != images.device:
            self.to(images.device)  # once: a blocking host-to-GPU copy per batch would stall the GPU queue
        # A float NCHW copy of the batch; from here on every step may work in place on it.
        x = torch.empty(images.permute(0, 3, 1, 2).shape, dtype=torch.float32, device=images.device)
        x = x.copy_(images.permute(0, 3, 1, 2)).div_(255)
        if train and self.augment.dihedral:
            x = _random_dihedral(x)
        if train:
            x = self._jitter(x)
        size = (self.image_size, self.image_size)
        if x.shape[-2:] != size:
            # Jitter first at patch size: upsampling 50 -> 224 would make it 20x dearer.
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        x = torch.addcmul(self.shift, x, self.scale, out=x)
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
