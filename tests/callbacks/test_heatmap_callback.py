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

from idc_lightning.callbacks.heatmap_writer import HeatmapCallback
from idc_lightning.evaluation.operating_point import OperatingPoint
from idc_lightning.interfaces import EvaluatedModel, PatchSource

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


class BareDataModule(L.LightningDataModule):
    """Yields row indices into the patch table; no pixels, no ground truth: heatmaps must still be drawn."""

    def __init__(self, table: pd.DataFrame) -> None:
        super().__init__()
        self.table = table

    def _loader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.arange(len(self.table))), batch_size=8)

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()


class PatchDataModule(BareDataModule):
    """The same rows as a PatchSource: pixels and per-patch ground truth."""

    def __init__(self, table: pd.DataFrame) -> None:
        super().__init__(table)
        self.pixels = np.random.default_rng(0).integers(0, 256, (len(table), 50, 50, 3), dtype=np.uint8)

    def split_frame(self, split: str) -> pd.DataFrame:
        return self.table

    def patches(self, cache_index: np.ndarray) -> np.ndarray:
        return self.pixels[cache_index]

    @staticmethod
    def truth(patient_id: str, frame: pd.DataFrame) -> np.ndarray:
        return frame["label"].to_numpy() == 1

    def balancing_class_weights(self) -> torch.Tensor:
        return torch.ones(2)


class FakeProbModule(L.LightningModule):
    """Fills predictions["val"/"test"] from fake probs, as the real module does after gathering."""

    def __init__(self, table: pd.DataFrame, threshold: float = 0.5) -> None:
        super().__init__()
        self.table = table
        self.predictions: dict[str, pd.DataFrame] = {}
        self.operating_point = OperatingPoint(threshold=threshold, method="youden", chosen_on="val")
        self.fixed_threshold = 0.5
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
        self.predictions["val"] = self._predictions()

    def on_test_epoch_end(self) -> None:
        self.predictions["test"] = self._predictions()


def test_fakes_implement_the_typed_interfaces() -> None:
    table = _patch_table()
    assert isinstance(PatchDataModule(table), PatchSource) and not isinstance(BareDataModule(table), PatchSource)
    assert isinstance(FakeProbModule(table), EvaluatedModel)


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
    assert callback.test_folder == out
    assert sorted(p.name for p in out.glob("*.png")) == ["p1.png", "p2.png"]
    assert sorted(p.name for p in out.glob("*.npy")) == ["p1.npy", "p2.npy"]
    assert np.load(out / "p1.npy").shape == (3, 4)
    written = pd.read_csv(out / "heatmaps.csv")
    assert written["patient_id"].tolist() == ["p1", "p2"]
    assert callback.patient_table is not None and callback.patient_table["dice"].between(0.5, 0.99).all()
    # At the model's operating point 0.5: the 6 IDC patches and the 0.9 false positive of 12 are called IDC.
    assert callback.patient_table["predicted_idc_pct"].tolist() == pytest.approx([700 / 12, 700 / 12])

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
    assert callback.dirname == "heatmaps"


def test_heatmaps_call_idc_at_the_model_operating_point(tmp_path: Path) -> None:
    """Operating point 0.85 (chosen on validation): the 0.8 IDC patches are no longer calls, the 0.9 one is; at
    0.5 all seven are."""
    table = _patch_table()
    for threshold, expected in ((0.85, 100 / 12), (0.5, 700 / 12)):
        callback = HeatmapCallback(max_patients=1)
        trainer = L.Trainer(accelerator="cpu", default_root_dir=tmp_path / str(threshold), logger=False,
                            callbacks=[callback], enable_progress_bar=False, enable_model_summary=False)
        trainer.test(FakeProbModule(table, threshold=threshold), datamodule=PatchDataModule(table))
        assert callback.patient_table["predicted_idc_pct"].tolist() == pytest.approx([expected])
