"""Lightning's overhead over a bare PyTorch loop: the same model, optimiser and pre-augmented batches."""

from __future__ import annotations

import time
from functools import partial

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from idc_lightning.bench.report import Row
from idc_lightning.data.augment_config import AugmentConfig
from idc_lightning.data.cache import PatchCache
from idc_lightning.data.datasets import PatchBatchDataset
from idc_lightning.data.device_augment import BatchAugment
from idc_lightning.models.classifier import IDCClassifier

TRAIN_BATCH = 64
WARMUP_BATCHES = 2


class _Batches(Dataset):
    """Pre-augmented batches, so both loops see identical inputs and no data-loading cost."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        return self.batches[position]


def training_batches(cache: PatchCache, count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    dataset = PatchBatchDataset(cache.folder / "images.u8", cache.images.shape, cache.rows)
    augment = BatchAugment(AugmentConfig())
    batches = []
    for _ in range(count):
        positions = torch.randint(len(dataset), (TRAIN_BATCH,), generator=generator).tolist()
        batch = dataset.__getitems__(positions)
        batches.append({**batch, "image": augment(batch["image"], train=True)})
    return batches


def _model(seed: int) -> IDCClassifier:
    torch.manual_seed(seed)
    return IDCClassifier(optimizer=partial(torch.optim.AdamW, lr=1e-3), pretrained=False, class_weights=None,
                         channels_last=False, compile=False)


class _StepClock(L.Callback):
    """Wall time from the first measured batch's start to the last batch's end (trainer set-up excluded)."""

    def __init__(self) -> None:
        self.started: float | None = None
        self.ended = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: object, idx: int) -> None:
        if idx == WARMUP_BATCHES:
            self.started = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: object) -> None:
        self.ended = time.perf_counter()


def lightning_rate(batches: list[dict[str, torch.Tensor]]) -> float:
    clock = _StepClock()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=len(batches), logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[clock])
    trainer.fit(_model(0), train_dataloaders=DataLoader(_Batches(batches), batch_size=None))
    measured = len(batches) - WARMUP_BATCHES
    return measured * TRAIN_BATCH / (clock.ended - clock.started)


def bare_rate(batches: list[dict[str, torch.Tensor]]) -> float:
    model = _model(0)
    model.train()
    optimizer = model.configure_optimizers()["optimizer"]
    started = None
    for position, batch in enumerate(DataLoader(_Batches(batches), batch_size=None)):
        if position == WARMUP_BATCHES:
            started = time.perf_counter()
        loss = F.cross_entropy(model(batch["image"]), batch["label"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (len(batches) - WARMUP_BATCHES) * TRAIN_BATCH / (time.perf_counter() - started)


def measure_training(cache: PatchCache, steps: int) -> list[Row]:
    batches = training_batches(cache, steps + WARMUP_BATCHES)
    # Alternated, best of two each: the first loop in a process also pays for allocator and thread-pool warm-up.
    lightning = lightning_rate(batches)
    bare = bare_rate(batches)
    lightning = max(lightning_rate(batches), lightning)
    bare = max(bare_rate(batches), bare)
    overhead = (bare / lightning - 1) * 100
    note = f"batch {TRAIN_BATCH}, {steps} steps after {WARMUP_BATCHES} warm-up, ResNet-18 at 50 px, best of 2"
    return [
        Row("training (cpu)", "bare PyTorch loop", bare, "img/s", note),
        Row("training (cpu)", "Lightning Trainer", lightning, "img/s", note),
        Row("training (cpu)", "Lightning overhead", overhead, "%",
            "time per image vs bare; includes the module's self.log and train AUROC update"),
    ]
