"""predict on Kaggle-layout folders, and its errors for bad inputs; slides are tested in tests/slides."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, TINY, compose_config

from idc_lightning.checkpoints import CheckpointError
from idc_lightning.predict import predict
from idc_lightning.slides.readers import SlideReadError

DATASET = f"synthetic_p{TINY['num_patients']}_s{TINY['seed']}/IDC_regular_ps50_idx5"


@pytest.fixture(scope="module")
def checkpoint(trained_checkpoint: Path) -> Path:
    return trained_checkpoint


@pytest.fixture(scope="module")
def patient(tiny_data_dir: Path) -> Path:
    return sorted(p for p in (tiny_data_dir / DATASET).iterdir() if p.is_dir() and p.name.isdigit())[0]


def run_predict(tiny_data_dir: Path, output_dir: Path, checkpoint: Path, source: Path, *overrides: str
                ) -> pd.DataFrame:
    cfg = compose_config("predict", output_dir, tiny_data_dir,
                         [f"ckpt_path={checkpoint}", f"input={source}", *overrides])
    return predict(cfg)


def test_patient_folder_gets_a_prediction_per_patch_and_a_heatmap(
        tiny_data_dir: Path, tmp_path: Path, checkpoint: Path, patient: Path) -> None:
    predictions = run_predict(tiny_data_dir, tmp_path, checkpoint, patient)
    patches = list(patient.rglob("*.png"))
    written = pd.read_csv(tmp_path / "predictions.csv")
    assert len(written) == len(patches) and list(written.columns) == [
        "patient_id", "x", "y", "label", "patch_prob", "prob"]
    assert written["prob"].between(0, 1).all() and written["label"].isin([0, 1]).all()
    assert written["prob"].std() > 0
    assert (tmp_path / "heatmaps" / f"{patient.name}.png").is_file()
    grid = np.load(tmp_path / "heatmaps" / f"{patient.name}.npy")
    assert np.isfinite(grid).sum() == len(predictions)  # one cell per patch; cells without a patch stay NaN


def test_folder_of_patients_draws_one_heatmap_per_patient(
        tiny_data_dir: Path, tmp_path: Path, checkpoint: Path) -> None:
    predictions = run_predict(tiny_data_dir, tmp_path, checkpoint, tiny_data_dir / DATASET, "predict.max_heatmaps=3")
    assert predictions["patient_id"].nunique() == TINY["num_patients"]
    assert len(list((tmp_path / "heatmaps").glob("*.png"))) == 3


def test_loose_unlabelled_patches_beside_a_stray_image_are_a_patch_folder(
        tiny_data_dir: Path, tmp_path: Path, checkpoint: Path, patient: Path) -> None:
    loose = tmp_path / "new_patient"
    loose.mkdir()
    patches = sorted(patient.rglob("*.png"))
    for path in patches:  # no class folder and no class in the name, as a new slide's patches come
        (loose / path.name.replace(f"_class{path.parent.name}", "")).write_bytes(path.read_bytes())
    (loose / "overview.png").write_bytes(patches[0].read_bytes())
    predictions = run_predict(tiny_data_dir, tmp_path / "out", checkpoint, loose)
    assert len(predictions) == len(patches) and set(predictions["patient_id"]) == {patient.name}
    assert predictions["label"].isna().all()
    skipped = pd.read_csv(tmp_path / "out" / "skipped_files.csv")
    assert skipped["path"].str.endswith("overview.png").tolist() == [True]
    (loose / "case12.svs").write_bytes(b"II*\0")
    with pytest.raises(ValueError, match=r"whole slides \(case12.svs\): predict them as two runs"):
        run_predict(tiny_data_dir, tmp_path / "mixed", checkpoint, loose)


def test_a_stray_image_beside_patient_folders_is_skipped_not_read_as_a_slide(
        tiny_data_dir: Path, tmp_path: Path, checkpoint: Path, patient: Path) -> None:
    patients = tmp_path / "patients"
    shutil.copytree(patient, patients / patient.name)
    (patients / "overview.png").write_bytes(next(patient.rglob("*.png")).read_bytes())
    predictions = run_predict(tiny_data_dir, tmp_path / "out", checkpoint, patients)
    assert len(predictions) == len(list(patient.rglob("*.png"))) and predictions["label"].notna().all()
    assert pd.read_csv(tmp_path / "out" / "skipped_files.csv")["path"].tolist() == ["overview.png"]


def test_bad_inputs_fail_with_clear_errors(tiny_data_dir: Path, tmp_path: Path, checkpoint: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist; give a patient folder"):
        run_predict(tiny_data_dir, tmp_path / "a", checkpoint, tmp_path / "missing")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(SlideReadError, match="broken.png could not be decoded"):
        run_predict(tiny_data_dir, tmp_path / "b", checkpoint, tmp_path / "broken.png")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SlideReadError, match="not a slide; supported"):
        run_predict(tiny_data_dir, tmp_path / "c", checkpoint, tmp_path / "notes.txt")
    (tmp_path / "blank.png").write_bytes(cv2.imencode(".png", np.full((200, 200, 3), 250, np.uint8))[1].tobytes())
    with pytest.raises(SlideReadError, match="no tile has"):
        run_predict(tiny_data_dir, tmp_path / "d", checkpoint, tmp_path / "blank.png")
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="not a checkpoint of this model"):
        run_predict(tiny_data_dir, tmp_path / "e", tmp_path / "other.ckpt", tmp_path / "blank.png")
    # Under DDP each rank would score its share of the patches and overwrite the others' files.
    with pytest.raises(ValueError, match="predict runs on one device, not 2: set trainer.devices=1"):
        run_predict(tiny_data_dir, tmp_path / "f", checkpoint, tiny_data_dir / DATASET, "trainer.devices=2")


@pytest.mark.slow
def test_predict_cli(tiny_data_dir: Path, tmp_path: Path, checkpoint: Path, patient: Path) -> None:
    command = [sys.executable, "-m", "idc_lightning.predict", f"ckpt_path={checkpoint}", f"input={patient}",
               "extras.print_config=false", f"paths.cache_dir={tmp_path / 'cache'}",
               f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(pd.read_csv(tmp_path / "run" / "predictions.csv")) == len(list(patient.rglob("*.png")))
