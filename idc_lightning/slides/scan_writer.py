"""Write a slide the way a scanner does: a tiled, compressed pyramid whose level 0 is the training-scale image
upsampled (16x: 4 um/px -> 0.25 um/px, a 40x scan), written tile by tile so level 0 is never held whole.

Used by the tests (a patient's slide rebuilt from its patches) and by the whole-slide benchmark (40k x 40k px).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile

SCAN_MPP = 0.25
UPSAMPLE = 16
LEVEL_FACTORS = (1, 4, 16)  # level downsamples, in Aperio's 4x steps
TILE = 256
METADATA = ("aperio", "resolution", "none")


def _tiles(image: np.ndarray, upsample: int) -> Iterator[np.ndarray]:
    height, width = image.shape[0] * upsample, image.shape[1] * upsample
    for top in range(0, height, TILE):
        for left in range(0, width, TILE):
            rows = np.arange(top, min(top + TILE, height)) // upsample
            cols = np.arange(left, min(left + TILE, width)) // upsample
            tile = np.full((TILE, TILE, 3), 255, np.uint8)
            tile[: len(rows), : len(cols)] = image[rows[:, None], cols[None, :]]
            yield tile


def write_scan(image: np.ndarray, path: Path, metadata: str = "aperio", upsample: int = UPSAMPLE) -> Path:
    """`image` (uint8 RGB at the training scale) as a pyramid at SCAN_MPP um/px. metadata: "aperio" (an SVS-style
    description with MPP), "resolution" (TIFF resolution tags in cm) or "none" (no scale recorded)."""
    if metadata not in METADATA:
        raise ValueError(f"metadata={metadata!r}: use one of {METADATA}")
    if any(upsample % factor for factor in LEVEL_FACTORS):
        raise ValueError(f"upsample={upsample} must be a multiple of every level factor {LEVEL_FACTORS}")
    height, width = image.shape[0] * upsample, image.shape[1] * upsample
    mpp = SCAN_MPP * UPSAMPLE / upsample  # level 0 of a 4 um/px image
    with tifffile.TiffWriter(path, bigtiff=height * width * 3 > 2**31) as writer:
        for factor in LEVEL_FACTORS:
            shape = (height // factor, width // factor, 3)
            options: dict[str, object] = {}
            if metadata == "aperio":
                options["description"] = (f"Aperio Image Library v12.0.0\r\n{width}x{height} [0,0 {width}x{height}] "
                                          f"({TILE}x{TILE}) RAW|AppMag = 40|MPP = {mpp}"
                                          if factor == 1 else f"{shape[1]}x{shape[0]}")
            elif metadata == "resolution":
                per_cm = 1e4 / (mpp * factor)
                options.update(resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")
            writer.write(_tiles(image, upsample // factor), shape=shape, dtype=np.uint8, tile=(TILE, TILE),
                         compression="zlib", photometric="rgb", metadata=None, subfiletype=int(factor > 1), **options)
    return path
