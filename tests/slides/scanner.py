"""Test slides the way a scanner writes them: a patient's slide rebuilt from its patches at the training scale,
then written by `idc_lightning.slides.scan_writer` as a 0.25 um/px pyramid."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from idc_lightning.data.manifest import build_manifest


def slide_from_patches(patient: Path) -> tuple[np.ndarray, pd.DataFrame]:
    """The patient's slide rebuilt on white at the training scale: Kaggle's x, y are 1-based pixel offsets."""
    manifest, _ = build_manifest(patient)
    width, height = int(manifest["x"].max()) + 49, int(manifest["y"].max()) + 49
    slide = np.full((height, width, 3), 255, np.uint8)
    for row in manifest.itertuples():
        patch = cv2.cvtColor(cv2.imread(str(patient / row.path)), cv2.COLOR_BGR2RGB)
        slide[row.y - 1 : row.y - 1 + patch.shape[0], row.x - 1 : row.x - 1 + patch.shape[1]] = patch
    return slide, manifest
