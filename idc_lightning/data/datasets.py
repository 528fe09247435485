"""Datasets over the packed patch cache; they open the memmap lazily so workers never pickle pixels."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

if TYPE_CHECKING:  # only a type here: the device-augment path and the GPU bench run without albumentations
    import albumentations as A


class _CachedPatches(Dataset):
    """Rows of one split; `index` in each batch is the row position, so predictions map back to patient/x/y."""

    def __init__(self, images_path: Path, shape: tuple[int, ...], frame: pd.DataFrame) -> None:
        self.images_path = Path(images_path)
        self.shape = tuple(shape)
        self.cache_index = frame["cache_index"].to_numpy(np.int64)
        self.labels = torch.as_tensor(frame["label"].to_numpy(np.int64))
        self._images: np.ndarray | None = None

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = np.memmap(self.images_path, dtype=np.uint8, mode="r", shape=self.shape)
        return self._images

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_images": None}

    def __len__(self) -> int:
        return len(self.cache_index)


class PatchDataset(_CachedPatches):
    """One patch at a time through a CPU (albumentations) transform: `data.augment_on: cpu`."""

    def __init__(self, images_path: Path, shape: tuple[int, ...], frame: pd.DataFrame, transform: A.Compose) -> None:
        super().__init__(images_path, shape, frame)
        self.transform = transform
        self._seeded_in: int | None = None

    def _seed_transform(self) -> None:
        """Albumentations keeps its own RNG: seed it from torch's per-process seed, which seed_everything and
        Lightning's worker init control, so runs repeat and workers differ."""
        if self._seeded_in != os.getpid():
            self.transform.set_random_seed(torch.initial_seed() % 2**32)
            self._seeded_in = os.getpid()

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        self._seed_transform()
        image = self.transform(image=np.asarray(self.images[self.cache_index[position]]))["image"]
        return {"image": image, "label": self.labels[position], "index": torch.tensor(position)}


class PatchBatchDataset(_CachedPatches):
    """Whole uint8 batches by one fancy-indexed memmap read: augmentation happens later, on the device."""

    def __getitems__(self, positions: list[int]) -> dict[str, torch.Tensor]:
        positions = np.asarray(positions, dtype=np.int64)
        images = torch.from_numpy(np.ascontiguousarray(self.images[self.cache_index[positions]]))
        return {"image": images, "label": self.labels[positions], "index": torch.from_numpy(positions)}

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        batch = self.__getitems__([position])
        return {key: value[0] for key, value in batch.items()}


def keep_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """collate_fn for PatchBatchDataset, whose __getitems__ already returns a batch."""
    return batch
