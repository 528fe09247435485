"""A real patient's slide as a 40x scan: rebuilt from its Kaggle patches, upsampled 16x to 0.25 um/px and written
as an Aperio-style pyramid, it gives the patch folder's predictions (skipped without the real sample)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import compose_config
from scanner import slide_from_patches

from idc_lightning.predict import predict
from idc_lightning.slides.scan_writer import write_scan

# Unseen by any split of the tests; 171 patches, a 1,200 x 1,700 px slide at 4 um/px (19k x 27k px at 40x).
PATIENT = "8916"


@pytest.mark.slow
def test_real_patient_scan_matches_its_patches(real_data: Path, tiny_data_dir: Path, tmp_path: Path,
                                               trained_checkpoint: Path) -> None:
    slide, _ = slide_from_patches(real_data / PATIENT)
    scan = write_scan(slide, tmp_path / f"{PATIENT}.svs")

    def run(name: str, source: Path, *overrides: str) -> pd.DataFrame:
        return predict(compose_config("predict", tmp_path / name, tiny_data_dir,
                                      [f"ckpt_path={trained_checkpoint}", f"input={source}", *overrides]))

    from_patches = run("patches", real_data / PATIENT)
    from_slide = run("slide", scan, "predict.min_tissue=0.02")
    tiles = from_slide.assign(x=from_slide["x"] + 1, y=from_slide["y"] + 1)
    paired = from_patches.merge(tiles, on=["x", "y"], suffixes=("_patch", "_tile"))
    assert len(paired) >= 0.9 * len(from_patches)
    assert np.corrcoef(paired["prob_patch"], paired["prob_tile"])[0, 1] >= 0.95
