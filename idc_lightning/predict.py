"""python -m idc_lightning.predict ckpt_path=PATH input=PATH: IDC probabilities and heatmaps for new data.

The model, its preprocessing and its operating point come from the checkpoint (a sweep folder or a list of
checkpoints: their ensemble). Patch folders go through the same IDCDataModule as training; whole slides (any format
OpenSlide reads, or PNG/JPEG/TIFF) are tiled at the training scale by `idc_lightning.slides` and give QuPath
GeoJSON, an overlay and slides.csv.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
import numpy as np
import pandas as pd
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from idc_lightning.builders import print_config_tree
from idc_lightning.checkpoints import EnsembleCheckpoint, RunCheckpoint, preprocessing_settings, read_model_checkpoint
from idc_lightning.data.manifest import UNLABELLED, holds_patches
from idc_lightning.data.stain import MACENKO_REFERENCE, StainReference
from idc_lightning.evaluation.heatmaps import write_patient_heatmaps
from idc_lightning.evaluation.report import PREDICTION_COLUMNS
from idc_lightning.models.classifier import IDCClassifier
from idc_lightning.slides.pipeline import SlideSettings, is_slide_folder, predict_slides
from idc_lightning.slides.readers import IMAGE_SUFFIXES, SLIDE_SUFFIXES

log = logging.getLogger(__name__)


def _collect(outputs: list[dict[str, torch.Tensor]]) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, row positions) from trainer.predict's per-batch outputs."""
    probs = torch.cat([batch["patch_prob"] for batch in outputs]).float().numpy()
    index = torch.cat([batch["index"] for batch in outputs]).numpy()
    return probs, index


def predict_patches(cfg: DictConfig, trainer: L.Trainer, model: IDCClassifier, settings: dict,
                    root: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """A patient folder or a folder of patients in the Kaggle layout; labels are used when the names carry them."""
    # The input is read as it is: nothing is generated (data.synthetic) next to a user's folder.
    datamodule = instantiate(cfg.data, root=str(root), batch_size=cfg.predict.batch_size, synthetic=None, **settings)
    probs, index = _collect(trainer.predict(model, datamodule=datamodule))
    predictions = model.predictions_of(datamodule.split_frame("predict").iloc[index], probs)
    # Nullable integers: 0/1 in the CSV, empty for patches whose names carry no class.
    predictions["label"] = predictions["label"].where(predictions["label"] != UNLABELLED).astype("Int64")
    return predictions, datamodule.cache.images


def stain_reference(settings: dict, checkpoint: RunCheckpoint | EnsembleCheckpoint) -> StainReference | None:
    """The Macenko target the training patches were normalised to (the standard one if training did not)."""
    if settings["stain_norm"] != "macenko":
        return None
    trained = checkpoint.preprocessing
    if not trained.stain_vectors:
        return MACENKO_REFERENCE
    return StainReference(np.asarray(trained.stain_vectors), np.asarray(trained.max_concentrations))


def slide_settings(cfg: DictConfig, settings: dict, checkpoint: RunCheckpoint | EnsembleCheckpoint,
                   threshold: float) -> SlideSettings:
    return SlideSettings(
        patch_size=settings["patch_size"], image_size=settings["image_size"], mean=tuple(settings["mean"]),
        std=tuple(settings["std"]), pad_value=settings["pad_value"], microns_per_pixel=settings["microns_per_pixel"],
        stain_reference=stain_reference(settings, checkpoint), stride=cfg.predict.stride,
        min_tissue=cfg.predict.min_tissue, max_saturation_threshold=cfg.predict.max_saturation_threshold,
        mpp=cfg.predict.mpp, batch_size=cfg.predict.batch_size, num_workers=cfg.predict.num_workers,
        threshold=threshold)


def refuse_whole_slides_beside_patches(source: Path) -> None:
    """Kaggle-named patches below make `source` a patch folder, and a stray PNG or JPEG there (an overview) is
    listed as skipped; a whole-slide file there would be dropped just as silently, so it is an error instead."""
    slides = sorted(p.name for p in source.iterdir()
                    if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES - IMAGE_SUFFIXES)
    if slides:
        named = ", ".join(slides[:3]) + (", ..." if len(slides) > 3 else "")
        raise ValueError(f"input={source} holds Kaggle patches (in it or below) and whole slides ({named}): predict "
                         "them as two runs, input=<the patch folder> and input=<a slide or a folder of slides only>")


def predict(cfg: DictConfig) -> pd.DataFrame:
    L.seed_everything(cfg.seed, workers=True)
    source = Path(cfg.input)
    if not source.exists():
        raise FileNotFoundError(f"input={source} does not exist; give a patient folder, a folder of patients "
                                f"or a slide / folder of slides ({', '.join(sorted(SLIDE_SUFFIXES))})")
    checkpoint = read_model_checkpoint(cfg.ckpt_path)
    settings = preprocessing_settings(cfg.data, checkpoint, cfg.allow_preprocessing_change)
    threshold = checkpoint.operating_point.threshold if cfg.predict.threshold is None else cfg.predict.threshold
    model = checkpoint.model()
    trainer = instantiate(cfg.trainer)
    if trainer.world_size > 1:
        # Each rank would see only its share of the patches and write the same files.
        raise ValueError(f"predict runs on one device, not {trainer.world_size}: set trainer.devices=1 "
                         "trainer.num_nodes=1 (or trainer=default)")
    if trainer.is_global_zero and cfg.extras.print_config:
        print_config_tree(cfg)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if source.is_file() or (is_slide_folder(source) and not holds_patches(source)):
        return predict_slides(trainer, model, slide_settings(cfg, settings, checkpoint, threshold), source,
                              output_dir)
    refuse_whole_slides_beside_patches(source)
    predictions, patches = predict_patches(cfg, trainer, model, settings, source)
    predictions[PREDICTION_COLUMNS].to_csv(output_dir / "predictions.csv", index=False)
    table = write_patient_heatmaps(predictions, lambda index: np.asarray(patches[index]), output_dir / "heatmaps",
                                   cfg.predict.max_heatmaps, threshold)
    table.to_csv(output_dir / "heatmaps" / "heatmaps.csv", index=False)
    log.info("Predicted %d patches of %d patient(s) at IDC when prob >= %.4f; heatmaps in %s",
             len(predictions), predictions["patient_id"].nunique(), threshold, output_dir / "heatmaps")
    return predictions


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
