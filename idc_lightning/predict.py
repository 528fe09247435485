"""python -m idc_lightning.predict ckpt_path=PATH input=PATH: IDC probabilities and heatmaps for new data."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import hydra
import lightning as L
import numpy as np
import pandas as pd
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from idc_lightning.builders import print_config_tree
from idc_lightning.checkpoints import load_weights
from idc_lightning.data.augment_config import AugmentConfig
from idc_lightning.data.cache import build_cache
from idc_lightning.data.device_augment import BatchAugment
from idc_lightning.data.manifest import UNLABELLED, build_manifest
from idc_lightning.heatmap import write_patient_heatmaps
from idc_lightning.slide import SLIDE_SUFFIXES, SlideReadError, tissue_tiles

log = logging.getLogger(__name__)


def _normalised_batch(indices: list[int], tiles: np.ndarray, normalise: BatchAugment) -> dict[str, torch.Tensor]:
    images = torch.from_numpy(np.ascontiguousarray(tiles[np.asarray(indices)]))
    return {"image": normalise(images, train=False)}


def predict_tiles(trainer: L.Trainer, model: L.LightningModule, tiles: np.ndarray, indices: np.ndarray,
                  normalise: BatchAugment, batch_size: int) -> np.ndarray:
    """P(IDC) for tiles[indices] (uint8 [N, 50, 50, 3], e.g. the packed cache's memmap, read a batch at a time),
    through Lightning's predict loop (devices, precision, progress bar)."""
    if len(indices) == 0:
        return np.empty(0, np.float32)
    loader = DataLoader(indices.tolist(), batch_size=batch_size,
                        collate_fn=partial(_normalised_batch, tiles=tiles, normalise=normalise))
    return torch.cat(trainer.predict(model, dataloaders=loader)).float().numpy()


def predict_patches(cfg: DictConfig, trainer: L.Trainer, model: L.LightningModule, normalise: BatchAugment,
                    root: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """A patient folder or a folder of patients in the Kaggle layout; labels are used when the names carry them."""
    manifest, report = build_manifest(root, cfg.paths.cache_dir)
    log.info("%s", report.summary())
    cache = build_cache(manifest, root, cfg.paths.cache_dir, patch_size=cfg.data.patch_size,
                        pad_value=cfg.data.pad_value, stain_norm=cfg.data.stain_norm)
    rows = cache.rows
    probs = predict_tiles(trainer, model, cache.images, rows["cache_index"].to_numpy(), normalise,
                          cfg.predict.batch_size)
    predictions = rows[["patient_id", "x", "y", "label", "cache_index"]].assign(prob=probs)
    # Nullable integers: 0/1 in the CSV, empty for patches whose names carry no class.
    predictions["label"] = predictions["label"].where(predictions["label"] != UNLABELLED).astype("Int64")
    return predictions, cache.images


def predict_slide(cfg: DictConfig, trainer: L.Trainer, model: L.LightningModule, normalise: BatchAugment,
                  path: Path) -> tuple[pd.DataFrame, np.ndarray]:
    if path.suffix.lower() not in SLIDE_SUFFIXES:
        raise SlideReadError(f"input={path} is a {path.suffix or 'suffix-less'} file; a slide image must be one of "
                             f"{', '.join(sorted(SLIDE_SUFFIXES))} (or give a folder of Kaggle patches)")
    tiles, xs, ys, (height, width) = tissue_tiles(path, cfg.data.patch_size, cfg.predict.stride,
                                                  cfg.predict.min_tissue, cfg.data.pad_value,
                                                  cfg.predict.max_saturation_threshold, cfg.predict.tiff_level)
    log.info("%s: %dx%d px, %d tissue tiles of %d px (stride %d)", path, width, height, len(tiles),
             cfg.data.patch_size, cfg.predict.stride)
    if len(tiles) == 0:
        raise SlideReadError(f"{path}: no tile has {cfg.predict.min_tissue:.0%} tissue; is it an H&E slide? "
                             "Lower predict.min_tissue to keep fainter tiles")
    probs = predict_tiles(trainer, model, tiles, np.arange(len(tiles)), normalise, cfg.predict.batch_size)
    predictions = pd.DataFrame({"patient_id": path.stem, "x": xs, "y": ys, "prob": probs,
                                "cache_index": np.arange(len(tiles))})
    return predictions, tiles


def predict(cfg: DictConfig) -> pd.DataFrame:
    L.seed_everything(cfg.seed, workers=True)
    source = Path(cfg.input)
    if not source.exists():
        raise FileNotFoundError(f"input={source} does not exist; give a patient folder, a folder of patients "
                                f"or a slide image ({', '.join(sorted(SLIDE_SUFFIXES))})")
    model = instantiate(cfg.model, pretrained=False)
    load_weights(model, cfg.ckpt_path)
    model.eval()
    trainer = instantiate(cfg.trainer)
    if trainer.is_global_zero and cfg.extras.print_config:
        print_config_tree(cfg)
    normalise = BatchAugment(AugmentConfig(), cfg.data.image_size, tuple(cfg.data.mean), tuple(cfg.data.std))
    if source.is_file():
        predictions, tiles = predict_slide(cfg, trainer, model, normalise, source)
        columns = ["x", "y", "prob"]
    else:
        predictions, tiles = predict_patches(cfg, trainer, model, normalise, source)
        columns = ["patient_id", "x", "y", "label", "prob"]
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    predictions[columns].to_csv(output_dir / "predictions.csv", index=False)
    table = write_patient_heatmaps(predictions, lambda index: np.asarray(tiles[index]), output_dir / "heatmaps",
                                   cfg.predict.max_heatmaps, cfg.predict.threshold)
    table.to_csv(output_dir / "heatmaps" / "heatmaps.csv", index=False)
    log.info("Predicted %d tiles of %d patient(s)/slide(s); heatmaps in %s", len(predictions),
             predictions["patient_id"].nunique(), output_dir / "heatmaps")
    return predictions


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
