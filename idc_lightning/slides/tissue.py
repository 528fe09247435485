"""Tissue first: a thumbnail read in bounded windows, an Otsu mask on it, and the grid tiles that lie on tissue.

Only the thumbnail (at most MAX_THUMBNAIL_PX pixels) and one read window are ever in memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from idc_lightning.slides.readers import SlideReader
from idc_lightning.slides.scale import SCALE_TOLERANCE, WorkingScale

# The mask is at least this many times coarser than the working scale: a 50-px tile spans 25x25 mask pixels.
MASK_DOWNSAMPLE = 2
# Coarser still on huge slides, so the thumbnail stays under this many pixels (~50 MB with its mask and sums).
MAX_THUMBNAIL_PX = 4_000_000
# Largest side, in pixels of the level read, of one region read: bounds memory whatever the slide's size.
MAX_READ_PX = 1024


@dataclass(frozen=True)
class Tissue:
    """The thumbnail (RGB, `downsample` working pixels per pixel), its tissue mask and the Otsu threshold."""

    thumbnail: np.ndarray
    mask: np.ndarray
    threshold: float
    downsample: int


def mask_downsample(scale: WorkingScale) -> int:
    """MASK_DOWNSAMPLE, or coarser where the thumbnail would pass MAX_THUMBNAIL_PX."""
    return max(MASK_DOWNSAMPLE, math.ceil(math.sqrt(scale.width * scale.height / MAX_THUMBNAIL_PX)))


def _thumbnail_level(reader: SlideReader, scale: WorkingScale, mask_mpp: float) -> int:
    """The coarsest level still at or finer than the mask's scale (downsampled from, never upsampled)."""
    fine_enough = [level for level, downsample in enumerate(reader.level_downsamples)
                   if scale.slide_mpp * downsample <= mask_mpp * (1 + SCALE_TOLERANCE)]
    return max(fine_enough or [scale.level], key=lambda index: reader.level_downsamples[index])


def read_thumbnail(reader: SlideReader, scale: WorkingScale, downsample: int) -> np.ndarray:
    """uint8 RGB at `downsample` working pixels per pixel, area-averaged from windows of at most MAX_READ_PX."""
    level = _thumbnail_level(reader, scale, scale.mpp * downsample)
    level_width, level_height = reader.level_dimensions[level]
    level_downsample = reader.level_downsamples[level]
    per_px = scale.level0_per_px * downsample / level_downsample  # level pixels per thumbnail pixel
    width, height = -(-scale.width // downsample), -(-scale.height // downsample)
    thumbnail = np.full((height, width, 3), 255, np.uint8)
    step = max(1, int(MAX_READ_PX / per_px))
    for top in range(0, height, step):
        for left in range(0, width, step):
            x0, y0 = round(left * per_px), round(top * per_px)
            x1 = min(round(min(left + step, width) * per_px), level_width)
            y1 = min(round(min(top + step, height) * per_px), level_height)
            if x1 <= x0 or y1 <= y0:
                continue
            region = reader.read_region((round(x0 * level_downsample), round(y0 * level_downsample)), level,
                                        (x1 - x0, y1 - y0))
            size = (max(1, round((x1 - x0) / per_px)), max(1, round((y1 - y0) / per_px)))
            small = cv2.resize(region, size, interpolation=cv2.INTER_AREA)
            window = thumbnail[top : top + size[1], left : left + size[0]]
            window[:] = small[: window.shape[0], : window.shape[1]]
    return thumbnail


def detect_tissue(reader: SlideReader, scale: WorkingScale, max_threshold: float) -> Tissue:
    """Otsu on the thumbnail's saturation (H&E tissue is coloured, glass white or grey), capped at max_threshold:
    on a slide that is nearly all tissue, Otsu would split pale stroma from dense tumour instead."""
    downsample = mask_downsample(scale)
    thumbnail = read_thumbnail(reader, scale, downsample)
    saturation = cv2.cvtColor(thumbnail, cv2.COLOR_RGB2HSV)[..., 1]
    threshold, _ = cv2.threshold(saturation, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    threshold = min(float(threshold), max_threshold)
    return Tissue(thumbnail=thumbnail, mask=saturation > threshold, threshold=threshold, downsample=downsample)


def tissue_tiles(tissue: Tissue, scale: WorkingScale, tile: int, stride: int, min_tissue: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) working-pixel corners of the grid tiles (anchored at the slide's origin, like the Kaggle patches)
    with at least `min_tissue` of their area on tissue; area beyond the slide counts as glass."""
    xs, ys = np.meshgrid(np.arange(0, scale.width, stride), np.arange(0, scale.height, stride))
    xs, ys = xs.ravel(), ys.ravel()
    summed = cv2.integral(tissue.mask.astype(np.uint8))  # (h + 1, w + 1): box sums in four lookups
    height, width = tissue.mask.shape
    downsample = tissue.downsample

    def corner(values: np.ndarray, limit: int) -> np.ndarray:
        return np.clip(np.round(values / downsample).astype(np.int64), 0, limit)

    left, right = corner(xs, width), corner(xs + tile, width)
    top, bottom = corner(ys, height), corner(ys + tile, height)
    tissue = summed[bottom, right] - summed[top, right] - summed[bottom, left] + summed[top, left]
    keep = tissue >= min_tissue * (tile / downsample) ** 2
    return xs[keep], ys[keep]
