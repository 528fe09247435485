"""IDCDataModule: files → manifest → patient split → packed cache → loaders (thin shell over plain functions).

Its checkpoint state (`state_dict`) is the data side of a self-describing checkpoint: the preprocessing the model
was trained with, the patients of each split and a fingerprint of the manifest, read back by eval and predict.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
from idc_lightning.data.input_files import report_input_files
from idc_lightning.data.manifest import UNLABELLED, ManifestReport, build_manifest
from idc_lightning.data.splits import (
    SPLITS,
    SplitError,
    check_split,
    read_split_file,
    split_file_names,
    split_patients,
    split_summary,
    unseen_patients_split,
)
from idc_lightning.data.stain import MACENKO_REFERENCE
from idc_lightning.data.synthetic import TREE, SyntheticSlides, TruthMasks, is_synthetic_tree
from idc_lightning.data.transforms import eval_transform, train_transform
from idc_lightning.interfaces import TruthSource
from idc_lightning.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    KAGGLE_MICRONS_PER_PIXEL,
    PAD_VALUE,
    PATCH_SIZE,
    Preprocessing,
)

SAMPLERS = ("random", "balanced", "patient")

log = logging.getLogger(__name__)


def sampling_weights(frame: pd.DataFrame, sampler: str) -> np.ndarray | None:
    """Relative chance of drawing each training patch: None (a plain shuffle) for `random`; `balanced` gives both
    classes equal mass; `patient` gives every patient equal mass, so the largest slides (13x the smallest in the
    real sample) do not set what a typical slide looks like."""
    if sampler not in SAMPLERS:
        raise ValueError(f"data.sampler={sampler!r}: use one of {', '.join(SAMPLERS)}")
    if sampler == "random":
        return None
    key = frame["label"] if sampler == "balanced" else frame["patient_id"]
    return 1.0 / key.map(key.value_counts()).to_numpy(np.float64)


class IDCDataModule(L.LightningDataModule):
    """Kaggle-layout IDC patches, split by patient, served from a uint8 memmap.

    `seen_patients` is for evaluating a trained model: the patients its checkpoint trained and validated on. Then
    every other labelled patient under `root` is a test patient (on the training tree, exactly the run's test
    split; on a new cohort, all of it), and a `split_file` whose test patients include a seen one is an error.
    """

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
        patch_size: int = PATCH_SIZE,
        pad_value: int = PAD_VALUE,
        stain_norm: str | None = None,
        microns_per_pixel: float = KAGGLE_MICRONS_PER_PIXEL,
        decode_workers: int | None = None,
        image_size: int = PATCH_SIZE,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        augment: dict[str, Any] | None = None,
        augment_on: str = "cpu",
        loader: str = "dataloader",
        sampler: str = "random",
        seed: int = 0,
        synthetic: SyntheticSlides | None = None,
        seen_patients: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if augment_on not in ("cpu", "device"):
            raise ValueError(f"data.augment_on={augment_on!r}: use cpu or device")
        if loader not in ("dataloader", "gpu_resident"):
            raise ValueError(f"data.loader={loader!r}: use dataloader or gpu_resident")
        if sampler not in SAMPLERS:
            raise ValueError(f"data.sampler={sampler!r}: use one of {', '.join(SAMPLERS)}")
        # Lightning stores these in every checkpoint (datamodule_hyper_parameters); the generator is no setting.
        self.save_hyperparameters(ignore=["synthetic", "seen_patients"])
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
        reference = MACENKO_REFERENCE if stain_norm == "macenko" else None
        self.preprocessing = Preprocessing(
            patch_size=patch_size, image_size=image_size, mean=tuple(mean), std=tuple(std), pad_value=pad_value,
            stain_norm=stain_norm, microns_per_pixel=microns_per_pixel,
            stain_vectors=() if reference is None else tuple(map(tuple, reference.stain_vectors.tolist())),
            max_concentrations=() if reference is None else tuple(reference.max_concentrations.tolist()),
        )
        self.decode_workers = decode_workers
        self.augment = AugmentConfig(**(augment or {}))
        # gpu_resident batches are raw uint8 on the device: augmentation has to happen there too.
        self.augment_on = "device" if loader == "gpu_resident" else augment_on
        self.loader = loader
        self.sampler = sampler
        self.seed = seed
        if synthetic is not None and self.root.name != TREE:
            # The generator (re)writes root.parent: never aim it at a folder it did not create.
            raise ValueError(f"data.synthetic generates slides into <folder>/{TREE}, but data.root={self.root} is "
                             "not such a folder; read existing patches with data=kaggle data.root=PATH instead")
        self.synthetic = synthetic
        self.seen_patients = None if seen_patients is None else {str(p) for p in seen_patients}
        # A generated set read as data=kaggle (eval, predict) keeps its masks, so its heatmaps keep their Dice.
        has_masks = synthetic is not None or is_synthetic_tree(self.root)
        self.truth: TruthSource | None = TruthMasks(self.root.parent, patch_size) if has_masks else None
        self.batch_augment = BatchAugment(self.augment, image_size, self.preprocessing.mean, self.preprocessing.std)
        self.report: ManifestReport | None = None
        self.cache: PatchCache | None = None
        self.split: pd.DataFrame | None = None
        self.frames: dict[str, pd.DataFrame] = {}

    def prepare_data(self) -> None:
        """Once per node, before setup: generate the synthetic slides if configured, then scan and pack."""
        if self.synthetic is not None:
            self.synthetic.ensure(self.root.parent)
        self._build_cache()

    def _build_cache(self) -> PatchCache:
        manifest, self.report = build_manifest(self.root, self.cache_dir)
        pre = self.preprocessing
        return build_cache(manifest, self.root, self.cache_dir, patch_size=pre.patch_size, pad_value=pre.pad_value,
                           stain_norm=pre.stain_norm, workers=self.decode_workers)

    def setup(self, stage: str | None = None) -> None:
        if self.cache is None:
            self.cache = self._build_cache()
            if self._is_global_zero():
                report_input_files(self.report, self.cache.skipped, self.root, self.output_dir)
        if stage == "predict":
            # Every patch, labelled or not: new slides may carry no class in their names.
            self.frames["predict"] = self.cache.rows.reset_index(drop=True)
            return
        if self.split is not None:
            return
        rows = self.cache.rows
        unlabelled = rows["label"] == UNLABELLED
        if unlabelled.any():
            log.warning("%d patches have no class in their name: usable by predict only, left out of the splits",
                        int(unlabelled.sum()))
            rows = rows[~unlabelled]
        self.split = self._split(rows)
        summary = split_summary(rows, self.split)
        check_split(summary, required=self._required_splits())
        joined = rows.merge(self.split, on="patient_id")
        self.frames = {name: joined[joined["split"] == name].reset_index(drop=True) for name in SPLITS}
        if self._is_global_zero():
            self._write_split()
            self._print_summary(summary)

    def _required_splits(self) -> tuple[str, ...]:
        """Training needs train and val (val picks the checkpoint and the operating point) and test unless
        data.test_fraction=0 holds none out; evaluation needs test only."""
        if self.seen_patients is not None:
            return ("test",)
        return SPLITS if self.holds_out_test() else ("train", "val")

    def holds_out_test(self) -> bool:
        """False when training with data.test_fraction=0, or a split file without test rows (the splits.csv such
        a run saved): every patient trains or validates, none is left to test (evaluation tests the patients a
        checkpoint never saw, whatever its training split was)."""
        if self.seen_patients is not None:
            return True
        if self.split_file:
            return "test" in split_file_names(self.split_file)
        return self.split_options["test_fraction"] > 0

    def _split(self, rows: pd.DataFrame) -> pd.DataFrame:
        evaluating = self.seen_patients is not None
        if self.split_file:
            split = read_split_file(self.split_file, rows, required=self._required_splits())
        elif evaluating:
            return unseen_patients_split(rows, self.seen_patients)
        else:
            return split_patients(rows, **self.split_options)
        if evaluating:
            leaked = sorted(self.seen_patients & set(split.loc[split["split"] == "test", "patient_id"]))
            if leaked:
                raise SplitError(
                    f"data.split_file={self.split_file} tests on {len(leaked)} patient(s) the checkpoint was trained "
                    f"or validated on: {leaked[:20]}. Their metrics would be inflated; remove them from the test rows "
                    "or drop data.split_file to test every patient the model has not seen"
                )
        return split

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

    def split_frame(self, split: str) -> pd.DataFrame:
        """Manifest rows (patient_id, x, y, label, path, cache_index) of one split, in loader order."""
        return self.frames[split]

    def patients(self) -> dict[str, list[str]]:
        """The patient ids of each split."""
        return {name: sorted(self.split.loc[self.split["split"] == name, "patient_id"].astype(str)) for name in SPLITS}

    def manifest_fingerprint(self) -> str:
        """Hash of the training and validation rows (patient, x, y, label): the data a checkpoint was fitted to."""
        rows = pd.concat([self.frames["train"], self.frames["val"]])[["patient_id", "x", "y", "label"]]
        rows = rows.sort_values(["patient_id", "y", "x"]).astype({"patient_id": str})
        return hashlib.sha1(pd.util.hash_pandas_object(rows, index=False).values.tobytes()).hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        """Saved by Lightning in every checkpoint: what eval and predict must reuse to see what training saw."""
        if self.split is None:
            return {}
        return {"preprocessing": self.preprocessing.to_dict(), "patients": self.patients(),
                "manifest_fingerprint": self.manifest_fingerprint()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resuming or testing a checkpoint with other patients or preprocessing would mix two experiments."""
        if not state_dict or self.split is None:
            return
        saved = Preprocessing.from_dict(state_dict["preprocessing"])
        changed = saved.differences(self.preprocessing)
        if changed:
            raise ValueError(f"The checkpoint was trained with other preprocessing: {changed} (checkpoint, config)")
        mine = self.patients()
        moved = {name: sorted(set(state_dict["patients"][name]) ^ set(mine[name])) for name in SPLITS}
        if any(moved.values()):
            raise SplitError(
                f"The checkpoint's patient split differs from this run's (patients that changed split: "
                f"{ {k: v[:10] for k, v in moved.items() if v} }); resume on the same data.root and split settings"
            )

    def balancing_class_weights(self) -> torch.Tensor:
        """Inverse class frequency of the training patches as the sampler draws them, normalised so a balanced set
        gives [1, 1]; so [1, 1] under the balanced sampler (weighting as well would correct the imbalance twice).
        A class absent from training keeps weight 1: there is nothing of it to up-weight."""
        frame = self.frames["train"]
        draws = sampling_weights(frame, self.sampler)
        labels = frame["label"].to_numpy()
        mass = np.bincount(labels, weights=draws, minlength=2).astype(np.float64)
        if self.sampler == "balanced":
            log.info("data.sampler=balanced already evens out the classes: inverse-frequency loss weights are off")
        weights = np.divide(mass.sum(), 2.0 * mass, out=np.ones(2), where=mass > 0)
        return torch.tensor(weights, dtype=torch.float32)

    def patches(self, cache_index: np.ndarray) -> np.ndarray:
        """Pixels of the given cache rows (for heatmap thumbnails)."""
        return np.asarray(self.cache.images[np.asarray(cache_index, dtype=np.int64)])

    def _dataloader(self, split: str, train: bool) -> DataLoader | ResidentBatches:
        frame = self.frames[split]
        if self.loader == "gpu_resident":
            resident = self._resident_batches(frame, train)
            if resident is not None:
                return resident
        shape = self.cache.images.shape
        images_path = self.cache.folder / IMAGES_FILE
        sampler = None
        draws = sampling_weights(frame, self.sampler) if train else None
        if draws is not None:
            sampler = WeightedRandomSampler(torch.as_tensor(draws, dtype=torch.double), len(frame))
        pre = self.preprocessing
        if self.augment_on == "device":
            dataset = PatchBatchDataset(images_path, shape, frame)
            collate = keep_batch
        else:
            transform = (train_transform(self.augment, pre.image_size, pre.mean, pre.std, pre.patch_size) if train
                         else eval_transform(pre.image_size, pre.mean, pre.std, pre.patch_size))
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
        # Lightning turns shuffling and weighted sampling off for overfit_batches only in DataLoaders; this loader is
        # told directly.
        overfitting = self.trainer is not None and bool(self.trainer.overfit_batches)
        draws = sampling_weights(frame, self.sampler) if train and not overfitting else None
        return ResidentBatches(images, labels, self.batch_size, shuffle=train and not overfitting,
                               sample_weights=None if draws is None else torch.as_tensor(draws), drop_last=train,
                               rank=rank, world_size=world_size, seed=self.seed)

    def train_dataloader(self) -> DataLoader | ResidentBatches:
        return self._dataloader("train", train=True)

    def val_dataloader(self) -> DataLoader | ResidentBatches:
        return self._dataloader("val", train=False)

    def require_test_split(self) -> None:
        """Called before training too: a run that must test finds out now, not after its last epoch."""
        if not self.holds_out_test():
            cause = (f"data.split_file={self.split_file} has no test rows" if self.split_file
                     else f"data.test_fraction=0 holds out no test patient under {self.root}")
            raise SplitError(
                f"{cause}: test the checkpoint on other patients with "
                "`python -m idc_lightning.eval ckpt_path=... data.root=...`, or train with test=false"
            )

    def test_dataloader(self) -> DataLoader | ResidentBatches:
        self.require_test_split()
        return self._dataloader("test", train=False)

    def predict_dataloader(self) -> DataLoader | ResidentBatches:
        return self._dataloader("predict", train=False)

    def on_after_batch_transfer(self, batch: dict[str, torch.Tensor], dataloader_idx: int) -> dict[str, torch.Tensor]:
        """Device-side augmentation: uint8 NHWC in, normalised float NCHW out, on whatever device the batch is."""
        if self.augment_on == "device":
            training = self.trainer.training if self.trainer is not None else True
            batch = {**batch, "image": self.batch_augment(batch["image"], train=training)}
        return batch
