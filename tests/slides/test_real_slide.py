"""A real patient's slide as a 40x scan: rebuilt from its Kaggle patches, upsampled 16x to 0.25 um/px and written
as an Aperio-style pyramid, it gives the patch folder's predictions (skipped without the real sample)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import compose_config
from scanner import slide_from_patches

from idc_lightning.checkpoints import read_model_checkpoint
from idc_lightning.predict import predict
from idc_lightning.preprocessing import KAGGLE_MICRONS_PER_PIXEL, PATCH_SIZE
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


# The whole-slide acceptance check for a real model: IDC_REAL_CHECKPOINT=PATH (a checkpoint, or a sweep folder for
# the folds' ensemble, that never saw the patient). Training one takes minutes, not test time, and the session's
# tiny checkpoint can only check agreement. No model trainable on a CPU passes yet: the small_data fold models call
# 2.2-12.9 of 11.6 mm2, the best two 12% under and 11% over, their ensemble 8.6, with weight averaging 9.2, at the F1
# operating point 8.0 (README, under the overlay).
REAL_CHECKPOINT = os.environ.get("IDC_REAL_CHECKPOINT")
# 62% IDC, the hardest test patient of real_cv's fixed test set; 11.6 mm2 annotated.
AREA_PATIENT = "9124"


@pytest.mark.slow
@pytest.mark.skipif(not REAL_CHECKPOINT, reason="set IDC_REAL_CHECKPOINT to a checkpoint of the real-data recipe")
def test_real_scan_idc_area_matches_the_annotated_area(real_data: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    if AREA_PATIENT in read_model_checkpoint(REAL_CHECKPOINT).seen_patients:
        pytest.skip(f"IDC_REAL_CHECKPOINT trained or validated on patient {AREA_PATIENT}")
    slide, manifest = slide_from_patches(real_data / AREA_PATIENT)
    scan = write_scan(slide, tmp_path / f"{AREA_PATIENT}.svs")
    predict(compose_config("predict", tmp_path / "slide", tiny_data_dir,
                           [f"ckpt_path={REAL_CHECKPOINT}", f"input={scan}", "predict.min_tissue=0.02"]))
    predicted_mm2 = pd.read_csv(tmp_path / "slide" / "slides.csv")["idc_mm2"].item()
    annotated_mm2 = int((manifest["label"] == 1).sum()) * (PATCH_SIZE * KAGGLE_MICRONS_PER_PIXEL) ** 2 / 1e6
    assert abs(predicted_mm2 - annotated_mm2) <= 0.10 * annotated_mm2, (predicted_mm2, annotated_mm2)
