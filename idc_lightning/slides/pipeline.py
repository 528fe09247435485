"""One slide, end to end: scale, tissue, streamed tiles through Lightning's predict loop, then the slide's files
and its row of slides.csv. Folders of slides run slide by slide; a slide that fails is listed, not fatal."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from idc_lightning.data.augment_config import AugmentConfig
from idc_lightning.data.device_augment import BatchAugment
from idc_lightning.data.stain import StainReference
from idc_lightning.evaluation.operating_point import is_idc
from idc_lightning.evaluation.spatial_context import smooth_on_grid
from idc_lightning.models.classifier import IDCClassifier
from idc_lightning.slides.geojson import feature_collection, tile_cells, write_geojson
from idc_lightning.slides.overlay import probability_grid, render_overlay, write_grid
from idc_lightning.slides.readers import SLIDE_SUFFIXES, SlideReader, SlideReadError, open_slide
from idc_lightning.slides.scale import WorkingScale, working_scale
from idc_lightning.slides.stain_map import STAIN_SAMPLE_TILES, StainMap, stain_map
from idc_lightning.slides.tiles import SlideTiles, TileGrid, tile_batch
from idc_lightning.slides.tissue import detect_tissue, tissue_tiles

log = logging.getLogger(__name__)

SLIDE_COLUMNS = ["slide", "path", "status", "error", "mpp", "mpp_source", "level", "tiles", "tissue_mm2",
                 "idc_mm2", "idc_fraction", "mean_prob", "max_prob", "seconds"]


@dataclass(frozen=True)
class SlideSettings:
    """What predict.* and the checkpoint say about tiling and scoring slides."""

    patch_size: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pad_value: int
    microns_per_pixel: float
    stain_reference: StainReference | None
    stride: int
    min_tissue: float
    max_saturation_threshold: float
    mpp: float | None
    batch_size: int
    num_workers: int
    threshold: float


def is_slide_folder(folder: Path) -> bool:
    """A folder holding slide files itself (patients' folders hold only sub-folders of patches)."""
    return any(p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES and not p.name.startswith(".")
               for p in folder.iterdir())


def list_slides(folder: Path) -> tuple[list[Path], list[Path]]:
    """(files to try, entries skipped): every visible file is tried, so unsupported ones get a listed reason;
    folders (a MIRAX slide's data folder) and hidden files (.DS_Store) are skipped."""
    entries = sorted(folder.iterdir())
    files = [p for p in entries if p.is_file() and not p.name.startswith(".")]
    return files, [p for p in entries if p not in files]


def output_names(paths: list[Path]) -> dict[Path, str]:
    """The file stem, or the whole name where two slides share a stem (a.svs and a.tif)."""
    stems = pd.Series([p.stem for p in paths])
    return {p: p.name if (stems == p.stem).sum() > 1 else p.stem for p in paths}


def _stain_sample(reader: SlideReader, scale: WorkingScale, grid: TileGrid, pad_value: int) -> np.ndarray:
    """Up to STAIN_SAMPLE_TILES tissue tiles spread over the slide, read at the working scale."""
    chosen = np.unique(np.linspace(0, len(grid) - 1, min(len(grid), STAIN_SAMPLE_TILES)).round().astype(int))
    sample = TileGrid(grid.x[chosen], grid.y[chosen], grid.tile, grid.stride)
    tiles = SlideTiles(reader.path, scale, sample, pad_value, None)
    return np.stack([tile for tile, _ in tiles])


def _predict_tiles(trainer: L.Trainer, model: IDCClassifier, dataset: SlideTiles, settings: SlideSettings
                   ) -> np.ndarray:
    normalise = BatchAugment(AugmentConfig(), settings.image_size, settings.mean, settings.std)
    loader = DataLoader(dataset, batch_size=settings.batch_size, num_workers=settings.num_workers,
                        collate_fn=partial(tile_batch, normalise=normalise))
    outputs = trainer.predict(model, dataloaders=loader)
    probs = np.full(len(dataset), np.nan, np.float32)
    index = torch.cat([batch["index"] for batch in outputs]).numpy()
    probs[index] = torch.cat([batch["patch_prob"] for batch in outputs]).float().numpy()
    return probs


def predict_slide(trainer: L.Trainer, model: IDCClassifier, settings: SlideSettings, path: Path, out_dir: Path,
                  name: str) -> tuple[dict[str, object], pd.DataFrame]:
    """Write `<name>.geojson`, `<name>_heatmap.png`, `<name>_prob.npy|.json`; return the slides.csv row and the
    per-tile predictions (working-scale and level-0 corners)."""
    started = time.perf_counter()
    reader = open_slide(path)
    try:
        scale = working_scale(reader, settings.microns_per_pixel, settings.mpp)
        tissue = detect_tissue(reader, scale, settings.max_saturation_threshold)
        xs, ys = tissue_tiles(tissue, scale, settings.patch_size, settings.stride, settings.min_tissue)
        grid = TileGrid(xs, ys, settings.patch_size, settings.stride)
        if len(grid) == 0:
            raise SlideReadError(f"{path}: no tile has {settings.min_tissue:.0%} tissue (Otsu threshold "
                                 f"{tissue.threshold:.0f} on saturation); is it an H&E slide? Lower "
                                 "predict.min_tissue to keep fainter tiles")
        stain: StainMap | None = None
        if settings.stain_reference is not None:
            stain = stain_map(_stain_sample(reader, scale, grid, settings.pad_value), settings.stain_reference)
    finally:
        reader.close()
    log.info("%s: %g um/px (%s), level %d resized %.3gx to %g um/px, %d tissue tiles", path, scale.slide_mpp,
             scale.mpp_source, scale.level, scale.zoom, scale.mpp, len(grid))
    patch_probs = _predict_tiles(trainer, model, SlideTiles(path, scale, grid, settings.pad_value, stain), settings)
    probs = smooth_on_grid(grid.x, grid.y, patch_probs, model.hparams.context_sigma, grid.tile, grid.stride)
    cells = tile_cells(grid.x, grid.y, grid.tile, grid.stride, scale.level0_per_px)
    collection = feature_collection(cells, probs, patch_probs, settings.threshold, scale.slide_mpp)
    write_geojson(collection, out_dir / f"{name}.geojson")
    prob_grid, geometry = probability_grid(grid, probs, scale)
    write_grid(prob_grid, grid, scale, settings.threshold, out_dir / name)
    cell_mm2 = (settings.stride * scale.mpp) ** 2 / 1e6
    idc = is_idc(probs, settings.threshold)
    idc_mm2 = sum(feature["properties"]["measurements"]["Area mm2"] for feature in collection["features"]
                  if feature["properties"]["objectType"] == "annotation")
    tissue_mm2 = len(grid) * cell_mm2
    render_overlay(tissue.thumbnail, prob_grid, geometry, scale, grid.tile, settings.threshold,
                   f"{name}: IDC {idc_mm2:.2f} of {tissue_mm2:.2f} mm2 tissue ({idc.mean():.1%} of tiles, "
                   f"prob >= {settings.threshold:.3f})", out_dir / f"{name}_heatmap.png")
    row = {"slide": name, "path": str(path), "status": "ok", "error": "", "mpp": scale.slide_mpp,
           "mpp_source": scale.mpp_source, "level": scale.level, "tiles": len(grid), "tissue_mm2": tissue_mm2,
           "idc_mm2": idc_mm2, "idc_fraction": idc_mm2 / tissue_mm2, "mean_prob": float(probs.mean()),
           "max_prob": float(probs.max()), "seconds": time.perf_counter() - started}
    tiles = pd.DataFrame({"slide": name, "x": grid.x, "y": grid.y,
                          "x_level0": np.round(grid.x * scale.level0_per_px).astype(int),
                          "y_level0": np.round(grid.y * scale.level0_per_px).astype(int), "patch_prob": patch_probs,
                          "prob": probs})
    return row, tiles


def failed_row(name: str, path: Path, error: Exception) -> dict[str, object]:
    return {"slide": name, "path": str(path), "status": "error", "error": str(error)}


def write_slides_table(rows: list[dict[str, object]], out_dir: Path) -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=SLIDE_COLUMNS)
    table.to_csv(out_dir / "slides.csv", index=False)
    return table


def predict_slides(trainer: L.Trainer, model: IDCClassifier, settings: SlideSettings, source: Path,
                   output_dir: Path) -> pd.DataFrame:
    """One slide or a folder of slides: per-slide files, slides.csv and predictions.csv (every tile).

    A single slide that fails raises; in a folder, a failing file is listed in slides.csv with its error and the
    others still run.
    """
    paths, skipped_entries = list_slides(source) if source.is_dir() else ([source], [])
    for skipped in skipped_entries:
        log.info("Skipped %s: a folder or hidden file (a MIRAX .mrxs finds its data folder itself)", skipped)
    names = output_names(paths)
    rows, tiles = [], []
    for path in tqdm(paths, desc="slides", unit="slide", disable=len(paths) < 2):
        try:
            row, predictions = predict_slide(trainer, model, settings, path, output_dir, names[path])
        except SlideReadError as error:
            if not source.is_dir():
                raise
            log.error("Skipped %s: %s", path, error)
            rows.append(failed_row(names[path], path, error))
            continue
        rows.append(row)
        tiles.append(predictions)
    table = write_slides_table(rows, output_dir)
    if not tiles:
        raise SlideReadError(f"input={source}: no slide could be predicted; see {output_dir / 'slides.csv'} "
                             f"for each file's error")
    predictions = pd.concat(tiles, ignore_index=True)
    predictions.to_csv(output_dir / "predictions.csv", index=False)
    log.info("Predicted %d of %d slide(s), %d tiles, IDC when prob >= %.4f; files in %s",
             int((table["status"] == "ok").sum()), len(table), len(predictions), settings.threshold, output_dir)
    return predictions
