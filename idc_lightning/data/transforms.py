"""Per-patch albumentations pipelines for the CPU loader (`augment_on: cpu`).

`device_augment.BatchAugment` implements the same steps on whole batches; keep the two in step.
Order: dihedral -> HED jitter (staining) -> colour jitter (scanner/camera) -> resize -> normalise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

from idc_lightning.data.augment_config import AugmentConfig
from idc_lightning.data.stain import hed_jitter
from idc_lightning.preprocessing import IMAGENET_MEAN, IMAGENET_STD, PATCH_SIZE


class HEDJitter(A.ImageOnlyTransform):
    """Albumentations wrapper around `stain.hed_jitter`, so both loader paths share one stain model.

    Used instead of albumentations' HEStain, which projects every pixel onto the H&E plane (dropping the
    residual even at zero jitter) and leaves bright pixels alone, so the two paths would disagree.
    """

    def __init__(self, sigma: float, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.sigma = sigma

    def get_params(self) -> dict[str, Any]:
        def draw(low: float, high: float) -> torch.Tensor:
            return torch.tensor([[self.py_random.uniform(low, high) for _ in range(3)]])

        return {"alpha": draw(1 - self.sigma, 1 + self.sigma), "beta": draw(-self.sigma, self.sigma)}

    def apply(self, img: np.ndarray, alpha: torch.Tensor, beta: torch.Tensor, **params: Any) -> np.ndarray:
        rgb = torch.from_numpy(img).unsqueeze(0).float().div_(255)
        jittered = hed_jitter(rgb, alpha, beta, dim=-1)[0]
        return jittered.mul_(255).round_().to(torch.uint8).numpy()

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("sigma",)


def _resize_and_normalize(image_size: int, patch_size: int, mean: Sequence[float], std: Sequence[float]) -> list[Any]:
    steps: list[Any] = []
    if image_size != patch_size:
        # INTER_AREA when shrinking: the antialiased counterpart of the device path's bilinear resize.
        steps.append(A.Resize(image_size, image_size, interpolation=cv2.INTER_LINEAR, area_for_downscale="image"))
    steps += [A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), ToTensorV2()]
    return steps


def train_transform(
    augment: AugmentConfig,
    image_size: int = PATCH_SIZE,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    patch_size: int = PATCH_SIZE,
) -> A.Compose:
    """uint8 HWC RGB patch (patch_size², as packed in the cache) -> augmented, normalised float32 CHW tensor."""
    steps: list[Any] = []
    if augment.dihedral:
        steps.append(A.SquareSymmetry(p=1.0))
    if augment.hed_jitter > 0:
        steps.append(HEDJitter(augment.hed_jitter))
    if augment.color_jitter:
        # p=1 and a random order of the four adjustments per patch: the device path draws the same way.
        steps.append(
            A.ColorJitter(
                brightness=augment.brightness,
                contrast=augment.contrast,
                saturation=augment.saturation,
                hue=augment.hue,
                p=1.0,
            )
        )
    return A.Compose(steps + _resize_and_normalize(image_size, patch_size, mean, std))


def eval_transform(
    image_size: int = PATCH_SIZE,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    patch_size: int = PATCH_SIZE,
) -> A.Compose:
    """uint8 HWC RGB patch (patch_size²) -> normalised float32 CHW tensor, no randomness."""
    return A.Compose(_resize_and_normalize(image_size, patch_size, mean, std))
