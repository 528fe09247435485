"""Small slide images (PNG, TIFF strips, tiled compressed TIFF) at the training scale: the tiles are the patches."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile
from conftest import TINY, compose_config
from scanner import slide_from_patches

from idc_lightning.checkpoints import read_checkpoint
from idc_lightning.evaluation.spatial_context import smooth_on_grid
from idc_lightning.predict import predict
from idc_lightning.slides.readers import open_slide
from idc_lightning.slides.scale import working_scale
from idc_lightning.slides.tiles import SlideTiles, TileGrid
from idc_lightning.slides.tissue import detect_tissue, tissue_tiles

DATASET = f"synthetic_p{TINY['num_patients']}_s{TINY['seed']}/IDC_regular_ps50_idx5"


@pytest.fixture(scope="module")
def patient(tiny_data_dir: Path) -> Path:
    return sorted(p for p in (tiny_data_dir / DATASET).iterdir() if p.is_dir() and p.name.isdigit())[0]


def run_predict(tiny_data_dir: Path, output_dir: Path, checkpoint: Path, source: Path, *overrides: str
                ) -> pd.DataFrame:
    return predict(compose_config("predict", output_dir, tiny_data_dir,
                                  [f"ckpt_path={checkpoint}", f"input={source}", *overrides]))


@pytest.mark.parametrize("fmt", ["png", "tiff_strips", "tiff_tiled_deflate"])
def test_slide_tiles_reproduce_the_patch_predictions(
        tiny_data_dir: Path, tmp_path: Path, trained_checkpoint: Path, patient: Path, fmt: str) -> None:
    slide, manifest = slide_from_patches(patient)
    path = tmp_path / ("slide.png" if fmt == "png" else "slide.tif")
    if fmt == "png":
        cv2.imwrite(str(path), cv2.cvtColor(slide, cv2.COLOR_RGB2BGR))
    elif fmt == "tiff_strips":
        tifffile.imwrite(path, slide, photometric="rgb", rowsperstrip=7)
    else:
        tifffile.imwrite(path, slide, photometric="rgb", tile=(64, 96), compression="zlib")
    from_patches = run_predict(tiny_data_dir, tmp_path / "patches", trained_checkpoint, patient)
    # Kaggle keeps pale patches (fat, edges) that a tissue mask drops: keep every tile with any tissue here.
    # tifffile records no scale: say the TIFFs are at the training scale; PNG is taken to be.
    scale = [] if fmt == "png" else ["predict.mpp=4.0"]
    from_slide = run_predict(tiny_data_dir, tmp_path / "slide", trained_checkpoint, path, "predict.min_tissue=0.02",
                             *scale)
    # Slide tiles start at pixel 0, the patches at Kaggle's 1-based offsets.
    tiles = from_slide.assign(x=from_slide["x"] + 1, y=from_slide["y"] + 1)
    paired = from_patches.merge(tiles, on=["x", "y"], suffixes=("_patch", "_tile"))
    assert len(paired) >= 0.8 * len(manifest), "the tissue mask dropped too many tissue patches"
    np.testing.assert_allclose(paired["patch_prob_tile"], paired["patch_prob_patch"], atol=1e-5)
    # In context they differ only where the tissue mask kept or dropped a neighbour the patch folder lacks or has.
    assert np.corrcoef(paired["prob_tile"], paired["prob_patch"])[0, 1] > 0.95
    assert list(pd.read_csv(tmp_path / "slide" / "predictions.csv").columns) == [
        "slide", "x", "y", "x_level0", "y_level0", "patch_prob", "prob"]
    assert (tmp_path / "slide" / "slide_heatmap.png").is_file() and (tmp_path / "slide" / "slide.geojson").is_file()


def test_overlapping_tiles_get_the_context_of_the_same_tissue(
        tiny_data_dir: Path, tmp_path: Path, trained_checkpoint: Path, patient: Path) -> None:
    slide, _ = slide_from_patches(patient)
    cv2.imwrite(str(tmp_path / "slide.png"), cv2.cvtColor(slide, cv2.COLOR_RGB2BGR))
    run_predict(tiny_data_dir, tmp_path / "run", trained_checkpoint, tmp_path / "slide.png", "predict.stride=25",
                "predict.min_tissue=0.02")
    tiles = pd.read_csv(tmp_path / "run" / "predictions.csv")
    sigma = read_checkpoint(trained_checkpoint).hyper_parameters["context_sigma"]
    # Sigma counts 50-px tiles: on the stride-25 grid it spans twice as many cells as on the Kaggle grid.
    expected = smooth_on_grid(tiles["x"].to_numpy(), tiles["y"].to_numpy(), tiles["patch_prob"].to_numpy(), sigma,
                              tile=50, step=25)
    assert tiles["prob"].to_numpy() == pytest.approx(expected, abs=1e-5)
    assert not np.allclose(tiles["prob"], tiles["patch_prob"])


def tiles_of(path: Path, stride: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    reader = open_slide(path)
    scale = working_scale(reader, 4.0)
    xs, ys = tissue_tiles(detect_tissue(reader, scale, 20), scale, 50, stride, 0.5)
    tiles = SlideTiles(path, scale, TileGrid(xs, ys, 50, stride), 255, None)
    return np.stack([tile for tile, _ in tiles]), list(zip(xs.tolist(), ys.tolist(), strict=True))


def test_tissue_mask_drops_glass_and_pads_border_tiles(tmp_path: Path) -> None:
    slide = np.full((120, 130, 3), 245, np.uint8)
    slide[:, 90:] = (200, 80, 160)  # a tissue-coloured strip reaching the right border
    cv2.imwrite(str(tmp_path / "s.png"), cv2.cvtColor(slide, cv2.COLOR_RGB2BGR))
    tiles, corners = tiles_of(tmp_path / "s.png", stride=50)
    # x=50 holds 10 tissue columns (20%), y=100 only 20 rows: dropped; x=100 holds 30 of 50 columns (60%): kept.
    assert corners == [(100, 0), (100, 50)]
    assert (tiles[:, :, 30:] == 255).all() and (tiles[:, :, :30] == (200, 80, 160)).all()
    _, corners = tiles_of(tmp_path / "s.png", stride=25)
    assert {x for x, _ in corners} == {75, 100} and {y for _, y in corners} == {0, 25, 50, 75}
