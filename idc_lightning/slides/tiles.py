"""Tiles, streamed: tissue tiles grouped into windows, each window read once at the working level, resized to the
training scale, stain-normalised and cut; Lightning's predict loop pulls them batch by batch.

Memory holds one window and one batch at a time, however large the slide.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from idc_lightning.data.device_augment import BatchAugment
from idc_lightning.slides.readers import SlideReader, open_slide
from idc_lightning.slides.scale import WorkingScale
from idc_lightning.slides.stain_map import StainMap
from idc_lightning.slides.tissue import MAX_READ_PX


@dataclass(frozen=True)
class TileGrid:
    """The tiles to predict: working-pixel corners, tile size and grid step."""

    x: np.ndarray
    y: np.ndarray
    tile: int
    stride: int

    def __len__(self) -> int:
        return len(self.x)


def windows(grid: TileGrid, scale: WorkingScale) -> list[np.ndarray]:
    """Tile indices grouped into square windows of at most MAX_READ_PX level pixels (plus one tile's overhang)."""
    span = max(1, int(MAX_READ_PX / (scale.zoom * grid.stride))) * grid.stride
    keys = (grid.y // span) * (scale.width // span + 1) + grid.x // span
    order = np.argsort(keys, kind="stable")
    _, starts = np.unique(keys[order], return_index=True)
    return np.split(order, starts[1:])


def to_working_scale(region: np.ndarray, size: tuple[int, int], zoom: float) -> np.ndarray:
    """A region read at the working level, resized to `size` working pixels (area averaging when shrinking)."""
    interpolation = cv2.INTER_AREA if zoom >= 1 else cv2.INTER_LINEAR
    if region.shape[1::-1] == size:
        return region
    return cv2.resize(region, size, interpolation=interpolation)


class SlideTiles(IterableDataset):
    """(tile uint8 [tile, tile, 3], index into the grid) for every grid tile, window by window.

    The slide is opened in the iterating process (OpenSlide handles do not cross process boundaries); with
    DataLoader workers, windows are dealt out round-robin.
    """

    def __init__(self, path: Path, scale: WorkingScale, grid: TileGrid, pad_value: int,
                 stain: StainMap | None) -> None:
        self.path, self.scale, self.grid, self.pad_value, self.stain = path, scale, grid, pad_value, stain

    def __len__(self) -> int:
        return len(self.grid)

    def __iter__(self) -> Iterator[tuple[np.ndarray, int]]:
        worker = get_worker_info()
        groups = windows(self.grid, self.scale)
        if worker is not None:
            groups = groups[worker.id :: worker.num_workers]
        reader = open_slide(self.path)
        try:
            for indices in groups:
                yield from self._cut(reader, indices)
        finally:
            reader.close()

    def _cut(self, reader: SlideReader, indices: np.ndarray) -> Iterator[tuple[np.ndarray, int]]:
        scale, tile = self.scale, self.grid.tile
        xs, ys = self.grid.x[indices], self.grid.y[indices]
        left, top = int(xs.min()), int(ys.min())
        right = min(int(xs.max()) + tile, scale.width)
        bottom = min(int(ys.max()) + tile, scale.height)
        level_width, level_height = reader.level_dimensions[scale.level]
        x0, y0 = round(left * scale.zoom), round(top * scale.zoom)
        x1, y1 = min(round(right * scale.zoom), level_width), min(round(bottom * scale.zoom), level_height)
        region = reader.read_region((round(left * scale.level0_per_px), round(top * scale.level0_per_px)),
                                    scale.level, (x1 - x0, y1 - y0))
        pixels = to_working_scale(region, (right - left, bottom - top), scale.zoom)
        if self.stain is not None:
            pixels = self.stain(pixels)
        canvas = np.full((int(ys.max()) + tile - top, int(xs.max()) + tile - left, 3), self.pad_value, np.uint8)
        canvas[: pixels.shape[0], : pixels.shape[1]] = pixels
        for index, x, y in zip(indices, xs - left, ys - top, strict=True):
            yield canvas[y : y + tile, x : x + tile], int(index)


def tile_batch(items: list[tuple[np.ndarray, int]], normalise: BatchAugment) -> dict[str, torch.Tensor]:
    """The model's input batch, normalised exactly as the training patches (no augmentation)."""
    images = torch.from_numpy(np.stack([tile for tile, _ in items]))
    return {"image": normalise(images, train=False), "index": torch.as_tensor([index for _, index in items])}

