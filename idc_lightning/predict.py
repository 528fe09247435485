"""python -m idc_lightning.predict ckpt_path=PATH input=PATH: IDC probabilities and heatmaps for new data.

The model, its preprocessing and its operating point come from the checkpoint. Patch folders go through the same
IDCDataModule as training; a slide image is cut into tiles and normalised like the training patches.
"""

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
from idc_lightning.checkpoints import RunCheckpoint, preprocessing_settings, read_checkpoint
from idc_lightning.data.augment_config import AugmentConfig
from idc_lightning.data.device_augment import BatchAugment
from idc_lightning.data.manifest import UNLABELLED
from idc_lightning.data.stain import MACENKO_REFERENCE, StainReference, macenko_normalize
from idc_lightning.evaluation.heatmaps import write_patient_heatmaps
from idc_lightning.models.classifier import IDCClassifier
from idc_lightning.slide import SLIDE_SUFFIXES, SlideReadError, tissue_tiles

log = logging.getLogger(__name__)


def _collect(outputs: list[dict[str, torch.Tensor]]) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, row positions) from trainer.predict's per-batch outputs."""
    probs = torch.cat([batch["prob"] for batch in outputs]).float().numpy()
    index = torch.cat([batch["index"] for batch in outputs]).numpy()
    return probs, index


def _tile_batch(indices: list[int], tiles: np.ndarray, normalise: BatchAugment) -> dict[str, torch.Tensor]:
    images = torch.from_numpy(np.ascontiguousarray(tiles[np.asarray(indices)]))
    return {"image": normalise(images, train=False), "index": torch.as_tensor(indices)}


def predict_patches(cfg: DictConfig, trainer: L.Trainer, model: IDCClassifier, settings: dict,
                    root: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """A patient folder or a folder of patients in the Kaggle layout; labels are used when the names carry them."""
    datamodule = instantiate(cfg.data, root=str(root), batch_size=cfg.predict.batch_size, **settings)
    probs, index = _collect(trainer.predict(model, datamodule=datamodule))
    rows = datamodule.split_frame("predict").iloc[index]
    predictions = rows[["patient_id", "x", "y", "label", "cache_index"]].assign(prob=probs).reset_index(drop=True)
    # Nullable integers: 0/1 in the CSV, empty for patches whose names carry no class.
    predictions["label"] = predictions["label"].where(predictions["label"] != UNLABELLED).astype("Int64")
    return predictions, datamodule.cache.images


def stain_reference(settings: dict, checkpoint: RunCheckpoint) -> StainReference | None:
    """The Macenko target the training patches were normalised to (the standard one if training did not)."""
    if settings["stain_norm"] != "macenko":
        return None
    trained = checkpoint.preprocessing
    if not trained.stain_vectors:
        return MACENKO_REFERENCE
    return StainReference(np.asarray(trained.stain_vectors), np.asarray(trained.max_concentrations))


def predict_slide(cfg: DictConfig, trainer: L.Trainer, model: IDCClassifier, settings: dict,
                  reference: StainReference | None, path: Path) -> tuple[pd.DataFrame, np.ndarray]:
    if path.suffix.lower() not in SLIDE_SUFFIXES:
        raise SlideReadError(f"input={path} is a {path.suffix or 'suffix-less'} file; a slide image must be one of "
                             f"{', '.join(sorted(SLIDE_SUFFIXES))} (or give a folder of Kaggle patches)")
    tiles, xs, ys, (height, width) = tissue_tiles(path, settings["patch_size"], cfg.predict.stride,
                                                  cfg.predict.min_tissue, settings["pad_value"],
                                                  cfg.predict.max_saturation_threshold, cfg.predict.tiff_level)
    log.info("%s: %dx%d px, %d tissue tiles of %d px (stride %d)", path, width, height, len(tiles),
             settings["patch_size"], cfg.predict.stride)
    if len(tiles) == 0:
        raise SlideReadError(f"{path}: no tile has {cfg.predict.min_tissue:.0%} tissue; is it an H&E slide? "
                             "Lower predict.min_tissue to keep fainter tiles")
    if reference is not None:
        # One slide is one patient: normalised as a whole to the training reference, as the cache does per patient.
        tiles = macenko_normalize(tiles, reference)
    normalise = BatchAugment(AugmentConfig(), settings["image_size"], settings["mean"], settings["std"])
    loader = DataLoader(list(range(len(tiles))), batch_size=cfg.predict.batch_size,
                        collate_fn=partial(_tile_batch, tiles=tiles, normalise=normalise))
    probs, index = _collect(trainer.predict(model, dataloaders=loader))
    predictions = pd.DataFrame({"patient_id": path.stem, "x": xs[index], "y": ys[index], "prob": probs,
                                "cache_index": index})
    return predictions, tiles


def predict(cfg: DictConfig) -> pd.DataFrame:
    L.seed_everything(cfg.seed, workers=True)
    source = Path(cfg.input)
    if not source.exists():
        raise FileNotFoundError(f"input={source} does not exist; give a patient folder, a folder of patients "
                                f"or a slide image ({', '.join(sorted(SLIDE_SUFFIXES))})")
    checkpoint = read_checkpoint(cfg.ckpt_path)
    settings = preprocessing_settings(cfg.data, checkpoint, cfg.allow_preprocessing_change)
    threshold = checkpoint.operating_point.threshold if cfg.predict.threshold is None else cfg.predict.threshold
    model = checkpoint.model()
    trainer = instantiate(cfg.trainer)
    if trainer.is_global_zero and cfg.extras.print_config:
        print_config_tree(cfg)
    if source.is_file():
        predictions, tiles = predict_slide(cfg, trainer, model, settings, stain_reference(settings, checkpoint), source)
        columns = ["x", "y", "prob"]
    else:
        predictions, tiles = predict_patches(cfg, trainer, model, settings, source)
        columns = ["patient_id", "x", "y", "label", "prob"]
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    predictions[columns].to_csv(output_dir / "predictions.csv", index=False)
    table = write_patient_heatmaps(predictions, lambda index: np.asarray(tiles[index]), output_dir / "heatmaps",
                                   cfg.predict.max_heatmaps, threshold)
    table.to_csv(output_dir / "heatmaps" / "heatmaps.csv", index=False)
    log.info("Predicted %d tiles of %d patient(s)/slide(s) at IDC when prob >= %.4f; heatmaps in %s",
             len(predictions), predictions["patient_id"].nunique(), threshold, output_dir / "heatmaps")
    return predictions


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
