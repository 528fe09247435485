from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from idc_lightning.callbacks.heatmap import HeatmapCallback

CONF = Path(__file__).resolve().parents[2] / "conf" / "callbacks" / "heatmap.yaml"
PATIENTS = ("p2", "p1", "p3")


def _patch_table() -> pd.DataFrame:
    """Three patients, 12 patches each on a Kaggle grid (origin 1, step 50); IDC in the right-hand columns."""
    frames = []
    for patient_id in PATIENTS:
        col, row = np.meshgrid(np.arange(4), np.arange(3))
        x, y = 1 + 50 * col.ravel(), 1 + 50 * row.ravel()
        label = (col.ravel() >= 2).astype(int)
        frames.append(pd.DataFrame({"patient_id": patient_id, "x": x, "y": y, "label": label}))
    frame = pd.concat(frames, ignore_index=True)
    frame["cache_index"] = np.arange(len(frame))
    return frame


class PatchDataModule(L.LightningDataModule):
    """Yields row indices into the patch table; offers the optional patches()/truth_for() of the contract."""

    def __init__(self, table: pd.DataFrame) -> None:
        super().__init__()
        self.table = table
        self.pixels = np.random.default_rng(0).integers(0, 256, (len(table), 50, 50, 3), dtype=np.uint8)

    def _loader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.arange(len(self.table))), batch_size=8)

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()

    def patches(self, cache_index: np.ndarray) -> np.ndarray:
        return self.pixels[cache_index]

    def truth_for(self, patient_id: str, frame: pd.DataFrame) -> np.ndarray:
        return frame["label"].to_numpy() == 1


class BareDataModule(PatchDataModule):
    """A datamodule without pixels or ground truth: heatmaps must still be drawn."""

    patches = None
    truth_for = None


class FakeProbModule(L.LightningModule):
    """Fills val_predictions / test_predictions from fake probs, as the real module does after gathering."""

    def __init__(self, table: pd.DataFrame) -> None:
        super().__init__()
        self.table = table
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return (self.weight - 1.0).pow(2).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.seen.append(batch[0])

    def test_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.seen.append(batch[0])

    def _predictions(self) -> pd.DataFrame:
        frame = self.table.iloc[torch.cat(self.seen).numpy()].copy()
        self.seen.clear()
        frame["prob"] = np.where(frame["label"] == 1, 0.8, 0.2)
        frame.loc[(frame["x"] == 1) & (frame["y"] == 1), "prob"] = 0.9  # a false positive: Dice below 1
        return frame

    def on_validation_epoch_end(self) -> None:
        self.val_predictions = self._predictions()

    def on_test_epoch_end(self) -> None:
        self.test_predictions = self._predictions()


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    yield
    import wandb

    wandb.finish()


def test_test_heatmaps_are_written_and_logged(tmp_path: Path, offline_wandb: None) -> None:
    table = _patch_table()
    callback = HeatmapCallback(max_patients=2)
    tensorboard = TensorBoardLogger(tmp_path)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_test_batches=10,
        default_root_dir=tmp_path / "run",
        logger=[WandbLogger(offline=True, save_dir=tmp_path), tensorboard],
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.test(FakeProbModule(table), datamodule=PatchDataModule(table))

    out = tmp_path / "run" / "heatmaps"
    assert sorted(p.name for p in out.glob("*.png")) == ["p1.png", "p2.png"]
    assert sorted(p.name for p in out.glob("*.npy")) == ["p1.npy", "p2.npy"]
    assert np.load(out / "p1.npy").shape == (3, 4)
    written = pd.read_csv(out / "heatmaps.csv")
    assert written["patient_id"].tolist() == ["p1", "p2"]
    assert callback.patient_table is not None and callback.patient_table["dice"].between(0.5, 0.99).all()

    wandb_images = list(tmp_path.glob("wandb/offline-run-*/files/media/images/*.png"))
    assert len(wandb_images) == 2

    events = EventAccumulator(tensorboard.log_dir).Reload()
    assert {"heatmaps/p1", "heatmaps/p2"} <= set(events.Tags()["images"])
    (dice,) = events.Scalars("test/heatmap_dice")
    assert dice.value == pytest.approx(callback.patient_table["dice"].mean())


def test_val_heatmaps_for_a_fixed_patient_set_without_pixels_or_truth(tmp_path: Path) -> None:
    table = _patch_table()
    callback = HeatmapCallback(every_n_val_epochs=1, val_patients=2)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        limit_train_batches=1,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        logger=False,
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(FakeProbModule(table), datamodule=BareDataModule(table))

    for epoch in (0, 1):
        out = tmp_path / "heatmaps" / "val" / f"epoch_{epoch}"
        assert sorted(p.name for p in out.glob("*.png")) == ["p1.png", "p2.png"]
    assert not (tmp_path / "heatmaps" / "heatmaps.csv").exists()


def test_callback_config_instantiates() -> None:
    callback = instantiate(OmegaConf.load(CONF).heatmap)
    assert isinstance(callback, HeatmapCallback)
    assert (callback.max_patients, callback.every_n_val_epochs, callback.val_patients) == (20, 0, 2)
    assert (callback.threshold, callback.dirname) == (0.5, "heatmaps")
