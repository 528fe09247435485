"""Slow end-to-end checks that the classifier learns IDC, not just that the pipeline runs.

Both train from random init on CPU through `train(cfg)` and assert on the metrics it returns; the thresholds sit
well below what was measured over several seeds (figures in each test's docstring), so a pass is not luck.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from conftest import compose_config

from idc_lightning.train import train

CPU_TRAINING = ["model.optimizer.lr=2e-3", "data.batch_size=64", "callbacks.early_stopping=null"]

# Generated slides: 30 patients, 4,472 patches. border_noise=0 draws the tumour exactly along its
# annotated outline: the default ragged border caps val AUROC near 0.92 (seeds 0-2: 0.921-0.929), too close to
# 0.9.
GENERATED = [
    "data.synthetic.num_patients=30",
    "data.synthetic.seed=0",
    "data.synthetic.grid_min=10",
    "data.synthetic.grid_max=24",
    "data.synthetic.border_noise=0.0",
]

# The 13 patients of the first real sample (it now holds 25; the others are left out by this split file, loudly):
# 8 train / 2 val / 3 test. The test patients span the range of IDC
# share (9022: 19%, 8917: 41%, 9124: 62%) and hold both classes; val takes two small, mid-IDC patients
# (8955: 37%, 9035: 22%) so that most patches are left for training.
REAL_SPLIT = {
    "train": ["8863", "8864", "8865", "8950", "8951", "8980", "9083", "9125"],
    "val": ["8955", "9035"],
    "test": ["8917", "9022", "9124"],
}


@pytest.mark.slow
def test_classifier_learns_idc_on_generated_slides(tmp_path: Path) -> None:
    """6 epochs from random init, about 70 s on 2 cores.

    Measured (val/auroc, test/auroc) with data and training seed s: s=0 0.945, 0.914; s=1 0.950, 0.920;
    s=2 0.978, 0.946.
    """
    overrides = [*GENERATED, "seed=0", "trainer.max_epochs=6", *CPU_TRAINING]
    metrics = train(compose_config("train", tmp_path / "run", tmp_path / "data", overrides))
    assert metrics["val/auroc"] > 0.9
    assert metrics["test/auroc"] > 0.85


@pytest.mark.slow
def test_classifier_learns_idc_on_real_tissue(real_data: Path, tmp_path: Path) -> None:
    """3 epochs from random init on 8 patients, about 70 s on 2 cores; test AUROC pooled over 3 patients.

    Macenko normalisation evens out the patients' stains: without it test AUROC spread 0.75-0.81 over seeds
    42, 1, 2. Measured with it (val/auroc, test/auroc): seed 42 0.941, 0.825; 1 0.938, 0.843; 2 0.939, 0.837;
    3 0.937, 0.858.
    """
    split_file = tmp_path / "split.csv"
    split = pd.DataFrame(
        [(pid, name) for name, pids in REAL_SPLIT.items() for pid in pids], columns=["patient_id", "split"]
    )
    split.to_csv(split_file, index=False)
    overrides = [
        "data=kaggle",
        f"data.root={real_data}",
        f"data.split_file={split_file}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "data.stain_norm=macenko",
        "trainer.max_epochs=3",
        *CPU_TRAINING,
    ]
    metrics = train(compose_config("train", tmp_path / "run", tmp_path / "data", overrides))
    written = pd.read_csv(tmp_path / "run" / "splits.csv", dtype=str)
    pd.testing.assert_frame_equal(
        written.sort_values("patient_id", ignore_index=True), split.sort_values("patient_id", ignore_index=True)
    )
    assert metrics["val/auroc"] > 0.85
    assert metrics["test/auroc"] > 0.75
