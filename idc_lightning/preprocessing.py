"""What a patch goes through before the network, defined once and carried inside every checkpoint.

Training, evaluation and prediction must feed the network identical inputs; these facts travel with the model
(see `models.classifier.IDCClassifier.on_save_checkpoint`) instead of being re-typed in each entry point's YAML.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

# The Kaggle grid: 50x50-px patches cut from 40x scans downsampled 16:1 (about 4 um per pixel).
PATCH_SIZE = 50
KAGGLE_MICRONS_PER_PIXEL = 4.0
# Slide-edge patches smaller than PATCH_SIZE are padded with glass (white).
PAD_VALUE = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STAIN_NORMS = (None, "macenko")
# ITU-R BT.601 luma: greyscale as torchvision and albumentations compute it (saturation jitter, faded tissue).
LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class Preprocessing:
    """uint8 patch on disk -> network input: pad to patch_size, (stain-normalise), resize, normalise."""

    patch_size: int = PATCH_SIZE
    image_size: int = PATCH_SIZE
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    pad_value: int = PAD_VALUE
    stain_norm: str | None = None
    # Macenko target: unit OD vectors of haematoxylin and eosin (2x3) and their 99th-percentile concentrations.
    stain_vectors: tuple[tuple[float, ...], ...] = ()
    max_concentrations: tuple[float, ...] = ()
    microns_per_pixel: float = KAGGLE_MICRONS_PER_PIXEL

    def __post_init__(self) -> None:
        if self.stain_norm not in STAIN_NORMS:
            raise ValueError(f"stain_norm={self.stain_norm!r} is not supported; use null or macenko")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> Preprocessing:
        known = {f.name for f in fields(cls)}
        return cls(**{k: _as_tuple(v) for k, v in values.items() if k in known})

    def differences(self, other: Preprocessing) -> dict[str, tuple[object, object]]:
        """{field: (self's value, other's value)} for every field that differs."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]}


def _as_tuple(value: object) -> object:
    if isinstance(value, list | tuple):
        return tuple(_as_tuple(v) for v in value)
    return value
