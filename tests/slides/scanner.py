"""Write test slides the way a scanner does: a tiled, compressed pyramid with level 0 at 0.25 um/px, from a slide
at the training scale (4 um/px) upsampled 16x, tile by tile so level 0 is never held whole."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import tifffile

from idc_lightning.data.manifest import build_manifest

SCAN_MPP = 0.25
UPSAMPLE = 16  # 4 um/px training scale / 0.25 um/px scan
LEVEL_FACTORS = (1, 4, 16)  # level downsamples, like Aperio's 4x steps
TILE = 256


def slide_from_patches(patient: Path) -> tuple[np.ndarray, pd.DataFrame]:
    """The patient's slide rebuilt on white at the training scale: Kaggle's x, y are 1-based pixel offsets."""
    manifest, _ = build_manifest(patient)
    width, height = int(manifest["x"].max()) + 49, int(manifest["y"].max()) + 49
    slide = np.full((height, width, 3), 255, np.uint8)
    for row in manifest.itertuples():
        patch = cv2.cvtColor(cv2.imread(str(patient / row.path)), cv2.COLOR_BGR2RGB)
        slide[row.y - 1 : row.y - 1 + patch.shape[0], row.x - 1 : row.x - 1 + patch.shape[1]] = patch
    return slide, manifest


def _tiles(slide: np.ndarray, upsample: int) -> Iterator[np.ndarray]:
    height, width = slide.shape[0] * upsample, slide.shape[1] * upsample
    for top in range(0, height, TILE):
        for left in range(0, width, TILE):
            rows = np.arange(top, min(top + TILE, height)) // upsample
            cols = np.arange(left, min(left + TILE, width)) // upsample
            tile = np.full((TILE, TILE, 3), 255, np.uint8)
            tile[: len(rows), : len(cols)] = slide[rows[:, None], cols[None, :]]
            yield tile


def write_scan(slide: np.ndarray, path: Path, metadata: str = "aperio") -> Path:
    """`slide` (training scale) as a scan: metadata "aperio" (SVS-style description with MPP), "resolution" (TIFF
    resolution tags in cm) or "none" (no scale recorded)."""
    height, width = slide.shape[0] * UPSAMPLE, slide.shape[1] * UPSAMPLE
    with tifffile.TiffWriter(path) as writer:
        for factor in LEVEL_FACTORS:
            upsample = UPSAMPLE // factor
            shape = (slide.shape[0] * upsample, slide.shape[1] * upsample, 3)
            options: dict[str, object] = {}
            if metadata == "aperio":
                options["description"] = (f"Aperio Image Library v12.0.0\r\n{width}x{height} [0,0 {width}x{height}] "
                                          f"({TILE}x{TILE}) RAW Q=70|AppMag = 40|MPP = {SCAN_MPP}"
                                          if factor == 1 else f"{shape[1]}x{shape[0]}")
            elif metadata == "resolution":
                per_cm = 1e4 / (SCAN_MPP * factor)
                options.update(resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")
            writer.write(_tiles(slide, upsample), shape=shape, dtype=np.uint8, tile=(TILE, TILE),
                         compression="zlib", photometric="rgb", metadata=None, subfiletype=int(factor > 1),
                         **options)
    return path
