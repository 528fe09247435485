"""predict on Kaggle-layout folders and on whole slide images (PNG, TIFF strips, tiled compressed TIFF)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from conftest import REPO, TINY, compose_config

from idc_lightning.checkpoints import CheckpointError
from idc_lightning.data.manifest import build_manifest
from idc_lightning.predict import predict
from idc_lightning.slide import SlideReadError, SlideRows, tissue_tiles

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


def slide_from_patches(patient: Path) -> tuple[np.ndarray, pd.DataFrame]:
    """The patient's slide rebuilt on white: Kaggle's x, y are 1-based pixel offsets of each patch."""
    manifest, _ = build_manifest(patient)
    width, height = int(manifest["x"].max()) + 49, int(manifest["y"].max()) + 49
    slide = np.full((height, width, 3), 255, np.uint8)
    for row in manifest.itertuples():
        patch = cv2.cvtColor(cv2.imread(str(patient / row.path)), cv2.COLOR_BGR2RGB)
        slide[row.y - 1 : row.y - 1 + patch.shape[0], row.x - 1 : row.x - 1 + patch.shape[1]] = patch
    return slide, manifest


def test_patient_folder_gets_a_prediction_per_patch_and_a_heatmap(
        tiny_data_dir: Path, tmp_path: Path, checkpoint: Path, patient: Path) -> None:
    predictions = run_predict(tiny_data_dir, tmp_path, checkpoint, patient)
    patches = list(patient.rglob("*.png"))
    written = pd.read_csv(tmp_path / "predictions.csv")
    assert len(written) == len(patches) and list(written.columns) == ["patient_id", "x", "y", "label", "prob"]
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


@pytest.mark.parametrize("fmt", ["png", "tiff_strips", "tiff_tiled_deflate"])
def test_slide_tiles_reproduce_the_patch_predictions(
        tiny_data_dir: Path, tmp_path: Path, checkpoint: Path, patient: Path, fmt: str) -> None:
    slide, manifest = slide_from_patches(patient)
    path = tmp_path / ("slide.png" if fmt == "png" else "slide.tif")
    if fmt == "png":
        cv2.imwrite(str(path), cv2.cvtColor(slide, cv2.COLOR_RGB2BGR))
    elif fmt == "tiff_strips":
        tifffile.imwrite(path, slide, photometric="rgb", rowsperstrip=7)
    else:
        tifffile.imwrite(path, slide, photometric="rgb", tile=(64, 96), compression="zlib")
    from_patches = run_predict(tiny_data_dir, tmp_path / "patches", checkpoint, patient)
    # Kaggle keeps pale patches (fat, edges) that a tissue mask drops: keep every tile with any tissue here.
    from_slide = run_predict(tiny_data_dir, tmp_path / "slide", checkpoint, path, "predict.min_tissue=0.02")
    # Slide tiles start at pixel 0, the patches at Kaggle's 1-based offsets.
    tiles = from_slide.assign(x=from_slide["x"] + 1, y=from_slide["y"] + 1)
    paired = from_patches.merge(tiles, on=["x", "y"], suffixes=("_patch", "_tile"))
    assert len(paired) >= 0.8 * len(manifest), "the tissue mask dropped too many tissue patches"
    np.testing.assert_allclose(paired["prob_tile"], paired["prob_patch"], atol=1e-5)
    assert set(pd.read_csv(tmp_path / "slide" / "predictions.csv").columns) == {"x", "y", "prob"}
    assert (tmp_path / "slide" / "heatmaps" / "slide.png").is_file()


def test_tiff_rows_stream_in_segments_and_match_the_image(tmp_path: Path) -> None:
    image = np.random.default_rng(0).integers(0, 256, (301, 257, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "tiled.tif", image, photometric="rgb", tile=(32, 48), compression="zlib")
    with SlideRows(tmp_path / "tiled.tif") as slide:
        assert slide._whole is None  # compressed: read segment by segment, not memory-mapped
        bands = [slide.rows(y, y + 50) for y in range(0, 301, 25)]
        assert len(slide._buffer) <= 50 + 32  # at most one tile row beyond the rows asked for
        with pytest.raises(ValueError, match="forward only"):
            slide.rows(0, 10)
    for y, band in zip(range(0, 301, 25), bands, strict=True):
        np.testing.assert_array_equal(band, image[y : y + 50])


def test_pyramid_level_is_chosen_and_a_missing_level_is_named(tmp_path: Path) -> None:
    image = np.random.default_rng(1).integers(0, 256, (256, 384, 3), dtype=np.uint8)
    with tifffile.TiffWriter(tmp_path / "pyramid.tif") as writer:
        writer.write(image, tile=(64, 64), compression="zlib", photometric="rgb", subifds=1)
        writer.write(image[::2, ::2], tile=(64, 64), compression="zlib", photometric="rgb", subfiletype=1)
    with SlideRows(tmp_path / "pyramid.tif", level=1) as slide:
        assert (slide.height, slide.width) == (128, 192)
        np.testing.assert_array_equal(slide.rows(0, 128), image[::2, ::2])
    with pytest.raises(SlideReadError, match="no pyramid level 2; its levels are 0: 384x256, 1: 192x128"):
        SlideRows(tmp_path / "pyramid.tif", level=2)


def test_tissue_mask_drops_glass_and_pads_border_tiles(tmp_path: Path) -> None:
    slide = np.full((120, 130, 3), 245, np.uint8)
    slide[:, 90:] = (200, 80, 160)  # a tissue-coloured strip reaching the right border
    cv2.imwrite(str(tmp_path / "s.png"), cv2.cvtColor(slide, cv2.COLOR_RGB2BGR))
    tiles, xs, ys, size = tissue_tiles(tmp_path / "s.png", stride=50, min_tissue=0.5)
    # x=50 holds 10 tissue columns (20%), y=100 only 20 rows: dropped; x=100 holds 30 of 50 columns (60%): kept.
    assert size == (120, 130) and list(zip(xs, ys, strict=True)) == [(100, 0), (100, 50)]
    assert (tiles[:, :, 30:] == 255).all() and (tiles[:, :, :30] == (200, 80, 160)).all()
    _, xs, ys, _ = tissue_tiles(tmp_path / "s.png", stride=25, min_tissue=0.5)
    assert set(xs) == {75, 100} and set(ys) == {0, 25, 50, 75}


def test_bad_inputs_fail_with_clear_errors(tiny_data_dir: Path, tmp_path: Path, checkpoint: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist; give a patient folder"):
        run_predict(tiny_data_dir, tmp_path / "a", checkpoint, tmp_path / "missing")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(SlideReadError, match="broken.png could not be decoded"):
        run_predict(tiny_data_dir, tmp_path / "b", checkpoint, tmp_path / "broken.png")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SlideReadError, match="must be one of"):
        run_predict(tiny_data_dir, tmp_path / "c", checkpoint, tmp_path / "notes.txt")
    (tmp_path / "blank.png").write_bytes(cv2.imencode(".png", np.full((200, 200, 3), 250, np.uint8))[1].tobytes())
    with pytest.raises(SlideReadError, match="no tile has"):
        run_predict(tiny_data_dir, tmp_path / "d", checkpoint, tmp_path / "blank.png")
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="not a checkpoint of this model"):
        run_predict(tiny_data_dir, tmp_path / "e", tmp_path / "other.ckpt", tmp_path / "blank.png")


@pytest.mark.slow
def test_predict_cli(tiny_data_dir: Path, tmp_path: Path, checkpoint: Path, patient: Path) -> None:
    command = [sys.executable, "-m", "idc_lightning.predict", f"ckpt_path={checkpoint}", f"input={patient}",
               "extras.print_config=false", f"paths.cache_dir={tmp_path / 'cache'}",
               f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(pd.read_csv(tmp_path / "run" / "predictions.csv")) == len(list(patient.rglob("*.png")))
