"""Training augmentation strengths: plain data, shared by the CPU (albumentations) and device (torch) paths.

Kept apart from `transforms` so the device path and the benchmarks never import albumentations.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation strengths, shared by the CPU and device paths."""

    dihedral: bool = True  # the 8 flips/90-degree rotations: histology has no orientation
    brightness: float = 0.1  # ColorJitter-style factor ranges [1-b, 1+b]
    contrast: float = 0.1
    saturation: float = 0.1
    hue: float = 0.04  # hue shift in fraction of a turn, [-h, h]
    hed_jitter: float = 0.0  # H&E stain jitter strength sigma (0 = off: on the CPU path it doubles the cost)

    def __post_init__(self) -> None:
        for name in ("brightness", "contrast", "saturation", "hue", "hed_jitter"):
            if getattr(self, name) < 0:
                raise ValueError(f"augment.{name} must be >= 0, got {getattr(self, name)}")
        if self.hue > 0.5:
            raise ValueError(f"augment.hue is a fraction of a turn and must be <= 0.5, got {self.hue}")

    @property
    def color_jitter(self) -> bool:
        return any((self.brightness, self.contrast, self.saturation, self.hue))
