"""Cut a whole slide image into 50-px tiles on tissue, the way the Kaggle patches were cut.

A slide is read as a forward-only stream of pixel rows: TIFFs one strip or one row of TIFF tiles at a time
(tifffile decodes segment by segment), so the decoded slide never sits in memory whole; PNG and JPEG have no
random access and are decoded at once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import tifffile

log = logging.getLogger(__name__)

SLIDE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}
TIFF_SUFFIXES = {".tif", ".tiff"}


class SlideReadError(ValueError):
    """The slide image cannot be read."""


def _as_rgb(image: np.ndarray, path: Path) -> np.ndarray:
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] < 3:
        raise SlideReadError(f"{path}: expected an RGB image, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise SlideReadError(f"{path}: expected 8-bit samples, got {image.dtype}; convert the slide to 8-bit RGB")
    return image[..., :3]


def _decode_whole(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise SlideReadError(f"{path} could not be decoded as an image (corrupt or unsupported format)")
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGB if image.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    return _as_rgb(image, path)


class SlideRows:
    """Pixel rows of a slide, read top to bottom; `rows(start, stop)` may not go back before an earlier start.

    `level` picks a level of a pyramidal TIFF (0 = full resolution): the model expects the Kaggle scale, about
    2.5x below a 40x scan.
    """

    def __init__(self, path: Path, level: int = 0) -> None:
        self.path = Path(path)
        self.level = level
        if not self.path.is_file():
            raise SlideReadError(f"{self.path} does not exist")
        self._tiff: tifffile.TiffFile | None = None
        self._whole: np.ndarray | None = None
        if self.path.suffix.lower() in TIFF_SUFFIXES:
            self._open_tiff()
        else:
            self._whole = _decode_whole(self.path)
            self.height, self.width = self._whole.shape[:2]
        self._buffer = np.empty((0, self.width, 3), np.uint8)
        self._buffer_start = 0
        self._segments: Iterator[np.ndarray] | None = None

    def _open_tiff(self) -> None:
        try:
            self._tiff = tifffile.TiffFile(self.path)
            levels = self._tiff.series[0].levels
        except (tifffile.TiffFileError, ValueError, OSError, IndexError) as error:
            raise SlideReadError(f"{self.path} could not be read as a TIFF: {error}") from error
        if not 0 <= self.level < len(levels):
            sizes = ", ".join(f"{i}: {lv.shape[1]}x{lv.shape[0]}" for i, lv in enumerate(levels))
            raise SlideReadError(f"{self.path} has no pyramid level {self.level}; its levels are {sizes}")
        page = levels[self.level].keyframe
        self._page = page
        if page.is_memmappable:
            self._whole = _as_rgb(tifffile.memmap(self.path, series=0, level=self.level, mode="r"), self.path)
        else:
            shape = page.shape
            if (page.planarconfig != 1 and page.samplesperpixel > 1) or page.imagedepth > 1:
                raise SlideReadError(f"{self.path}: planar or 3-D TIFFs are not supported; save it as RGB (contig)")
            self.height, self.width = shape[0], shape[1]
        if self._whole is not None:
            self.height, self.width = self._whole.shape[:2]

    def _segment_rows(self) -> Iterator[np.ndarray]:
        """Full-width bands as tifffile decodes strips or tiles; TIFF tiles of one row are stitched together."""
        band: np.ndarray | None = None
        band_y = 0
        for segment, index, shape in self._page.segments(maxworkers=1):
            _, _, y, x, _ = index
            length, width = shape[1], shape[2]
            if band is None or y != band_y:
                if band is not None:
                    yield band
                band_y = y
                band = np.empty((min(length, self.height - y), self.width, 3), np.uint8)
            rows = band.shape[0]
            columns = min(width, self.width - x)
            if segment is None:  # tifffile: an empty segment is background
                band[:, x : x + columns] = 255
            else:
                pixels = np.asarray(segment).reshape(shape[1:])
                pixels = _as_rgb(pixels[..., 0] if pixels.shape[2] == 1 else pixels, self.path)
                band[:, x : x + columns] = pixels[:rows, :columns]
        if band is not None:
            yield band

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, min(stop, height)) as (rows, width, 3) uint8."""
        stop = min(stop, self.height)
        if self._whole is not None:
            return np.asarray(self._whole[start:stop])
        if start < self._buffer_start:
            raise ValueError(f"rows are read forward only: asked for {start} after {self._buffer_start}")
        if self._segments is None:
            self._segments = self._segment_rows()
        drop = min(start - self._buffer_start, len(self._buffer))
        self._buffer, self._buffer_start = self._buffer[drop:], self._buffer_start + drop
        while self._buffer_start + len(self._buffer) < stop:
            self._buffer = np.concatenate([self._buffer, next(self._segments)])
        return self._buffer[start - self._buffer_start : stop - self._buffer_start]

    def close(self) -> None:
        if self._tiff is not None:
            self._tiff.close()

    def __enter__(self) -> SlideRows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tissue_threshold(path: Path, max_threshold: float = 20, level: int = 0, downsample: int = 8,
                     band: int = 512) -> float:
    """Otsu on the saturation of a thumbnail (H&E tissue is coloured, glass is white or grey), capped at
    max_threshold: on a slide that is nearly all tissue, Otsu would split pale stroma from dense tumour instead."""
    with SlideRows(path, level) as slide:
        thumbnail = np.concatenate([
            slide.rows(y, y + band)[(-y) % downsample :: downsample, ::downsample]
            for y in range(0, slide.height, band)
        ])
    saturation = cv2.cvtColor(np.ascontiguousarray(thumbnail), cv2.COLOR_RGB2HSV)[..., 1]
    threshold, _ = cv2.threshold(saturation, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return min(float(threshold), max_threshold)


def tissue_tiles(path: Path, tile: int = 50, stride: int = 50, min_tissue: float = 0.5, pad_value: int = 255,
                 max_threshold: float = 20, level: int = 0
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    """(tiles uint8 [N, tile, tile, 3], x, y, (height, width)) of every tile with >= min_tissue of it on tissue.

    x, y are the tiles' top-left pixel offsets; tiles at the right/bottom border are padded like the Kaggle edge
    patches. Only tissue tiles are kept in memory, never the decoded slide.
    """
    threshold = tissue_threshold(path, max_threshold, level)
    tiles, xs, ys = [], [], []
    with SlideRows(path, level) as slide:
        for y in range(0, slide.height, stride):
            strip = slide.rows(y, y + tile)
            saturation = cv2.cvtColor(np.ascontiguousarray(strip), cv2.COLOR_RGB2HSV)[..., 1] > threshold
            for x in range(0, slide.width, stride):
                if saturation[:, x : x + tile].sum() < min_tissue * tile * tile:
                    continue
                pixels = np.full((tile, tile, 3), pad_value, np.uint8)
                part = strip[:, x : x + tile]
                pixels[: part.shape[0], : part.shape[1]] = part
                tiles.append(pixels)
                xs.append(x)
                ys.append(y)
        size = (slide.height, slide.width)
    if not tiles:
        return np.empty((0, tile, tile, 3), np.uint8), np.empty(0, int), np.empty(0, int), size
    return np.stack(tiles), np.asarray(xs), np.asarray(ys), size
