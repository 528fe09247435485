"""One slide-reader interface over OpenSlide (vendor formats, tiled TIFF), tifffile (plain TIFF) and OpenCV (PNG/JPEG).

Every reader answers in OpenSlide's terms: level sizes as (width, height), downsamples from level 0, regions
addressed by their top-left corner in level-0 pixels, and the level-0 microns per pixel when the file records it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import openslide
import tifffile

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
TIFF_SUFFIXES = {".tif", ".tiff"}
# What OpenSlide opens (openslide.org/formats); .tif covers Philips, Ventana and generic tiled TIFF.
OPENSLIDE_SUFFIXES = {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".dcm", ".czi"}
SLIDE_SUFFIXES = IMAGE_SUFFIXES | TIFF_SUFFIXES | OPENSLIDE_SUFFIXES
MICRONS_PER_UNIT = {2: 25_400.0, 3: 10_000.0}  # TIFF ResolutionUnit: inch, centimetre
# Pixels OpenSlide reports fully transparent (outside the scanned area) are glass.
GLASS = 255


class SlideReadError(ValueError):
    """The file cannot be read as a slide: missing, corrupt, unsupported, or unusable as given."""


class SlideReader(Protocol):
    """A slide's pyramid: what `tiling` needs, whatever the file format."""

    path: Path
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None
    # PNG/JPEG carry no scale: they are taken to be at the training scale, as before whole-slide support.
    at_training_scale: bool

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """uint8 RGB [height, width, 3] at `level`, top-left `location` in level-0 pixels, inside the level."""
        ...

    def close(self) -> None: ...


def _rgb(image: np.ndarray, path: Path) -> np.ndarray:
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] < 3:
        raise SlideReadError(f"{path}: expected an RGB image, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise SlideReadError(f"{path}: expected 8-bit samples, got {image.dtype}; convert the slide to 8-bit RGB")
    return image[..., :3]


class OpenSlideReader:
    """Aperio SVS, Hamamatsu NDPI, MIRAX, Leica SCN, Philips TIFF, DICOM, generic tiled TIFF."""

    at_training_scale = False

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._slide = openslide.OpenSlide(path)
        except openslide.OpenSlideError as error:
            raise SlideReadError(f"{path}: OpenSlide recognises the format but cannot read it (corrupt or "
                                 f"truncated file?): {error}") from error
        self.level_dimensions = tuple(self._slide.level_dimensions)
        self.level_downsamples = tuple(self._slide.level_downsamples)
        self.mpp = self._mpp()

    def _mpp(self) -> float | None:
        properties = self._slide.properties
        values = [float(properties[key]) for key in (openslide.PROPERTY_NAME_MPP_X, openslide.PROPERTY_NAME_MPP_Y)
                  if key in properties and float(properties[key]) > 0]
        if not values:
            return None
        if max(values) > 1.01 * min(values):
            log.warning("%s: pixels are not square (mpp-x %s, mpp-y %s); using their mean", self.path, *values)
        return float(np.mean(values))

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        try:
            rgba = np.asarray(self._slide.read_region(location, level, size))
        except openslide.OpenSlideError as error:
            raise SlideReadError(f"{self.path}: reading {size} px at {location}, level {level} failed (corrupt "
                                 f"tile?): {error}") from error
        rgb = rgba[..., :3].copy()
        rgb[rgba[..., 3] == 0] = GLASS
        return rgb

    def close(self) -> None:
        self._slide.close()


def _tiff_mpp(page: tifffile.TiffPage) -> float | None:
    """Microns per pixel from the TIFF resolution tags; None when the unit is missing (tifffile's default)."""
    unit = page.tags.get("ResolutionUnit")
    resolution = page.tags.get("XResolution")
    if unit is None or resolution is None or int(unit.value) not in MICRONS_PER_UNIT:
        return None
    numerator, denominator = resolution.value
    pixels_per_unit = numerator / denominator if denominator else 0
    return MICRONS_PER_UNIT[int(unit.value)] / pixels_per_unit if pixels_per_unit > 0 else None


class TiffReader:
    """Plain (striped or untiled) TIFFs OpenSlide refuses: memory-mapped when uncompressed, else decoded per level.

    For small images only: a compressed level is decoded whole on its first read.
    """

    at_training_scale = False

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._tiff = tifffile.TiffFile(path)
            levels = self._tiff.series[0].levels
        except (tifffile.TiffFileError, ValueError, OSError, IndexError) as error:
            raise SlideReadError(f"{path} could not be read as a TIFF (corrupt or not a TIFF): {error}") from error
        self._levels = levels
        self.level_dimensions = tuple((int(level.shape[1]), int(level.shape[0])) for level in levels)
        width = self.level_dimensions[0][0]
        self.level_downsamples = tuple(width / w for w, _ in self.level_dimensions)
        self.mpp = _tiff_mpp(levels[0].keyframe)
        self._decoded: dict[int, np.ndarray] = {}

    def _level(self, level: int) -> np.ndarray:
        if level not in self._decoded:
            page = self._levels[level].keyframe
            try:
                if page.is_memmappable:
                    pixels = tifffile.memmap(self.path, series=0, level=level, mode="r")
                else:
                    pixels = self._levels[level].asarray()
            except (tifffile.TiffFileError, ValueError, OSError) as error:
                raise SlideReadError(f"{self.path}: level {level} could not be decoded (corrupt TIFF?): "
                                     f"{error}") from error
            self._decoded[level] = _rgb(pixels, self.path)
        return self._decoded[level]

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        scale = self.level_downsamples[level]
        x, y = round(location[0] / scale), round(location[1] / scale)
        return np.array(self._level(level)[y : y + size[1], x : x + size[0]])

    def close(self) -> None:
        self._tiff.close()


class ImageReader:
    """PNG or JPEG: no random access, decoded whole; one level, at the training scale."""

    at_training_scale = True
    mpp = None
    level_downsamples = (1.0,)

    def __init__(self, path: Path) -> None:
        self.path = path
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if image is None:
            raise SlideReadError(f"{path} could not be decoded as an image (corrupt or unsupported format)")
        if image.ndim == 3:
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGB if image.shape[2] == 4 else cv2.COLOR_BGR2RGB)
        self._image = _rgb(image, path)
        self.level_dimensions = ((self._image.shape[1], self._image.shape[0]),)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        x, y = location
        return self._image[y : y + size[1], x : x + size[0]].copy()

    def close(self) -> None:
        del self._image


def open_slide(path: Path) -> SlideReader:
    """The reader for `path`: PNG/JPEG by OpenCV, what OpenSlide recognises by OpenSlide, other TIFFs by tifffile."""
    path = Path(path)
    if not path.is_file():
        raise SlideReadError(f"{path} does not exist or is not a file")
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return ImageReader(path)
    if suffix not in SLIDE_SUFFIXES:
        raise SlideReadError(f"{path} is a {suffix or 'suffix-less'} file, not a slide; supported: "
                             f"{', '.join(sorted(SLIDE_SUFFIXES))} (or give a folder of Kaggle patches)")
    if openslide.OpenSlide.detect_format(path) is not None:
        return OpenSlideReader(path)
    if suffix in TIFF_SUFFIXES:
        return TiffReader(path)
    raise SlideReadError(f"{path}: OpenSlide does not recognise this {suffix} file (corrupt, truncated, or a "
                         "companion file rather than the slide itself); check that it opens in a slide viewer")
