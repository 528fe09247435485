"""IDCDataModule: files → manifest → patient split → packed cache → loaders (thin shell over plain functions)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import lightning as L
import numpy as np
import pandas as pd
import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, WeightedRandomSampler

from idc_lightning.data.augment_config import AugmentConfig
from idc_lightning.data.cache import IMAGES_FILE, PatchCache, build_cache
from idc_lightning.data.datasets import PatchBatchDataset, PatchDataset, keep_batch
from idc_lightning.data.device_augment import BatchAugment
from idc_lightning.data.gpu_resident import ResidentBatches, fits_on_device
from idc_lightning.data.manifest import UNLABELLED, ManifestReport, build_manifest
from idc_lightning.data.splits import SPLITS, check_split, read_split_file, split_patients, split_summary
from idc_lightning.data.synthetic import SyntheticSlides
from idc_lightning.data.transforms import eval_transform, train_transform

log = logging.getLogger(__name__)


class IDCDataModule(L.LightningDataModule):
    """Kaggle-layout IDC patches, split by patient, served from a uint8 memmap."""

    def __init__(
        self,
        root: str | Path,
        cache_dir: str | Path,
        output_dir: str | Path | None = None,
        batch_size: int = 256,
        num_workers: int = 2,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        num_folds: int | None = None,
        fold: int = 0,
        split_seed: int = 0,
        split_file: str | Path | None = None,
        patch_size: int = 50,
        pad_value: int = 255,
        stain_norm: str | None = None,
        decode_workers: int | None = None,
        image_size: int = 50,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        augment: dict[str, Any] | None = None,
        augment_on: str = "cpu",
        loader: str = "dataloader",
        sampler: str = "random",
        mask_dir: str | Path | None = None,
        synthetic: SyntheticSlides | None = None,
    ) -> None:
        super().__init__()
        if augment_on not in ("cpu", "device"):
            raise ValueError(f"data.augment_on={augment_on!r}: use cpu or device")
        if loader not in ("dataloader", "gpu_resident"):
            raise ValueError(f"data.loader={loader!r}: use dataloader or gpu_resident")
        if sampler not in ("random", "balanced"):
            raise ValueError(f"data.sampler={sampler!r}: use random or balanced")
        self.root = Path(root)
        self.cache_dir = Path(cache_dir)
        self.output_dir = Path(output_dir) if output_dir else None
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.split_options = {"val_fraction": val_fraction, "test_fraction": test_fraction,
                              "num_folds": num_folds, "fold": fold, "seed": split_seed}
        self.split_file = split_file
        self.cache_options = {"patch_size": patch_size, "pad_value": pad_value, "stain_norm": stain_norm,
                              "workers": decode_workers}
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.augment = AugmentConfig(**(augment or {}))
        # gpu_resident batches are raw uint8 on the device: augmentation has to happen there too.
        self.augment_on = "device" if loader == "gpu_resident" else augment_on
        self.loader = loader
        self.sampler = sampler
        self.mask_dir = Path(mask_dir) if mask_dir else None
        self.synthetic = synthetic
        self.batch_augment = BatchAugment(self.augment, image_size, self.mean, self.std)
        self.report: ManifestReport | None = None
        self.cache: PatchCache | None = None
        self.split: pd.DataFrame | None = None
        self.frames: dict[str, pd.DataFrame] = {}

    def prepare_data(self) -> None:
        self._build_cache()

    def _build_cache(self) -> PatchCache:
        if self.synthetic is not None:
            self.synthetic.ensure(self.root.parent)
        manifest, self.report = build_manifest(self.root, self.cache_dir)
        return build_cache(manifest, self.root, self.cache_dir, **self.cache_options)

    def setup(self, stage: str | None = None) -> None:
        if self.cache is not None:
            return
        self.cache = self._build_cache()
        rows = self.cache.rows
        unlabelled = rows["label"] == UNLABELLED
        if unlabelled.any():
            log.warning("%d patches have no class in their name: usable by predict only, left out of the splits",
                        int(unlabelled.sum()))
            rows = rows[~unlabelled]
        if self.split_file:
            self.split = read_split_file(self.split_file, rows)
        else:
            self.split = split_patients(rows, **self.split_options)
        summary = split_summary(rows, self.split)
        check_split(summary)
        joined = rows.merge(self.split, on="patient_id")
        self.frames = {name: joined[joined["split"] == name].reset_index(drop=True) for name in SPLITS}
        if self._is_global_zero():
            self._write_split()
            self._print_summary(summary)

    def _is_global_zero(self) -> bool:
        return self.trainer is None or self.trainer.is_global_zero

    def _write_split(self) -> None:
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.split.sort_values(["split", "patient_id"]).to_csv(self.output_dir / "splits.csv", index=False)

    def _print_summary(self, summary: pd.DataFrame) -> None:
        table = Table(title=f"IDC patches under {self.root}")
        for column in ("split", "patients", "patches", "IDC %"):
            table.add_column(column, justify="left" if column == "split" else "right")
        for row in summary.itertuples():
            table.add_row(row.Index, f"{row.patients}", f"{row.patches:,}", f"{row.idc_pct:.1f}")
        Console().print(table)
        if self.report is not None:
            log.info("%s", self.report.summary())
        if len(self.cache.skipped):
            log.warning("%d patch files skipped, listed in %s", len(self.cache.skipped),
                        self.cache.folder / "skipped.csv")

    def split_frame(self, split: str) -> pd.DataFrame:
        """Manifest rows (patient_id, x, y, label, path, cache_index) of one split, in loader order."""
        return self.frames[split]

    @property
    def class_weights(self) -> torch.Tensor:
        """Inverse class frequency of the training split, normalised so a balanced set gives [1, 1]."""
        counts = np.bincount(self.frames["train"]["label"].to_numpy(), minlength=2).astype(np.float64)
        return torch.tensor(counts.sum() / (2.0 * np.maximum(counts, 1.0)), dtype=torch.float32)

    def patches(self, cache_index: np.ndarray) -> np.ndarray:
        """Pixels of the given cache rows (for heatmap thumbnails)."""
        return np.asarray(self.cache.images[np.asarray(cache_index, dtype=np.int64)])

    def truth_for(self, patient_id: str, frame: pd.DataFrame) -> np.ndarray | None:
        """Per-row ground truth from the patient's IDC mask (generated slides only), else None."""
        if self.mask_dir is None or not (self.mask_dir / f"{patient_id}.png").is_file():
            return None
        mask = cv2.imread(str(self.mask_dir / f"{patient_id}.png"), cv2.IMREAD_GRAYSCALE) > 127
        size = self.cache_options["patch_size"]
        cells = zip(frame["x"], frame["y"], strict=True)
        return np.array([mask[y : y + size, x : x + size].mean() > 0.5 for x, y in cells])

    def _dataloader(self, split: str, train: bool) -> DataLoader | ResidentBatches:
        frame = self.frames[split]
        if self.loader == "gpu_resident":
            resident = self._resident_batches(frame, train)
            if resident is not None:
                return resident
        shape = self.cache.images.shape
        images_path = self.cache.folder / IMAGES_FILE
        sampler = None
        if train and self.sampler == "balanced":
            labels = frame["label"].to_numpy()
            weights = 1.0 / np.bincount(labels, minlength=2)[labels]
            sampler = WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), len(frame))
        if self.augment_on == "device":
            dataset = PatchBatchDataset(images_path, shape, frame)
            collate = keep_batch
        else:
            transform = (train_transform(self.augment, self.image_size, self.mean, self.std) if train
                         else eval_transform(self.image_size, self.mean, self.std))
            dataset = PatchDataset(images_path, shape, frame, transform)
            collate = None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            drop_last=train and len(frame) > self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            collate_fn=collate,
        )

    def _resident_batches(self, frame: pd.DataFrame, train: bool) -> ResidentBatches | None:
        device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
        nbytes = len(frame) * int(np.prod(self.cache.images.shape[1:]))
        if not fits_on_device(nbytes, device):
            log.warning("The split's %.1f GB of patches do not fit on %s: using the DataLoader instead",
                        nbytes / 1e9, device)
            return None
        images = torch.from_numpy(self.patches(frame["cache_index"].to_numpy())).to(device)
        labels = torch.as_tensor(frame["label"].to_numpy(np.int64), device=device)
        world_size = self.trainer.world_size if self.trainer else 1
        rank = self.trainer.global_rank if self.trainer else 0
        return ResidentBatches(images, labels, self.batch_size, shuffle=train,
                               balanced=train and self.sampler == "balanced", drop_last=train,
                               rank=rank, world_size=world_size, seed=self.split_options["seed"])

    def train_dataloader(self) -> DataLoader | ResidentBatches:
        return self._dataloader("train", train=True)

    def val_dataloader(self) -> DataLoader | ResidentBatches:
        return self._dataloader("val", train=False)

    def test_dataloader(self) -> DataLoader | ResidentBatches:
        return self._dataloader("test", train=False)

    def on_after_batch_transfer(self, batch: dict[str, torch.Tensor], dataloader_idx: int) -> dict[str, torch.Tensor]:
        """Device-side augmentation: uint8 NHWC in, normalised float NCHW out, on whatever device the batch is."""
        if self.augment_on == "device":
            training = self.trainer.training if self.trainer is not None else True
            batch = {**batch, "image": self.batch_augment(batch["image"], train=training)}
        return batch
