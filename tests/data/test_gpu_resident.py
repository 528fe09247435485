"""ResidentBatches: epoch coverage, rank sharding and reproducible orders without a DataLoader."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch

from idc_lightning.data.gpu_resident import ResidentBatches, fits_on_device


def _split(n: int, positive_every: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Patches whose first pixel encodes their row, so batches can be checked against `index`."""
    images = torch.zeros(n, 50, 50, 3, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n) % 256
    labels = (torch.arange(n) % positive_every == 0).long()
    return images, labels


def _epoch(batches: ResidentBatches) -> torch.Tensor:
    return torch.cat([batch["index"] for batch in batches])


def test_every_patch_once_per_epoch() -> None:
    images, labels = _split(103)
    loader = ResidentBatches(images, labels, batch_size=10, shuffle=True)
    batches = list(loader)
    assert len(batches) == len(loader) == 11
    index = torch.cat([batch["index"] for batch in batches])
    assert torch.equal(index.sort().values, torch.arange(103))
    assert not torch.equal(index, torch.arange(103))
    for batch in batches:
        assert batch["image"].dtype == torch.uint8 and batch["image"].shape[1:] == (50, 50, 3)
        assert batch["label"].dtype == torch.int64 and batch["index"].dtype == torch.int64
        assert torch.equal(batch["image"][:, 0, 0, 0].long(), batch["index"] % 256)
        assert torch.equal(batch["label"], labels[batch["index"]])


def test_drop_last_keeps_only_full_batches() -> None:
    loader = ResidentBatches(*_split(103), batch_size=10, shuffle=True, drop_last=True)
    assert len(loader) == 10
    assert all(len(batch["index"]) == 10 for batch in loader)


@pytest.mark.parametrize(("n", "world_size"), [(5, 1), (8, 1), (11, 2)])
def test_drop_last_never_leaves_an_epoch_without_batches(n: int, world_size: int) -> None:
    """A shard smaller than one batch keeps its partial batch: zero training batches would be a silent no-op."""
    images, labels = _split(n)
    loader = ResidentBatches(images, labels, batch_size=8, shuffle=True, drop_last=True, world_size=world_size)
    assert len(loader) == 1
    assert len(list(loader)) == 1


def test_no_shuffle_keeps_row_order() -> None:
    loader = ResidentBatches(*_split(25), batch_size=8, shuffle=False)
    assert torch.equal(_epoch(loader), torch.arange(25))


@pytest.mark.parametrize("n", [100, 101])
def test_rank_shards_are_disjoint_and_cover_the_epoch(n: int) -> None:
    images, labels = _split(n)
    ranks = [ResidentBatches(images, labels, 8, shuffle=True, rank=r, world_size=2, seed=7) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1])
    for rank in ranks:
        rank.set_epoch(3)
    shards = [_epoch(rank) for rank in ranks]
    both = torch.cat(shards)
    assert torch.equal(both.unique(), torch.arange(n))
    # only the wrap-around padding (n odd) may repeat a patch
    assert len(both) - n == n % 2


def test_epochs_differ_and_seed_plus_epoch_reproduces() -> None:
    images, labels = _split(200)
    loader = ResidentBatches(images, labels, 16, shuffle=True, seed=1)
    first, second = _epoch(loader), _epoch(loader)
    assert not torch.equal(first, second)
    again = ResidentBatches(images, labels, 16, shuffle=True, seed=1)
    again.set_epoch(1)
    assert torch.equal(_epoch(again), second)
    assert torch.equal(_epoch(again), _epoch(loader)), "without set_epoch both move on to epoch 2"
    other_seed = ResidentBatches(images, labels, 16, shuffle=True, seed=2)
    assert not torch.equal(_epoch(other_seed), first)


def test_lightning_sets_the_epoch_through_the_sampler_even_after_iter() -> None:
    """Lightning calls set_epoch on `loader.sampler`, and for a run's first epoch only after iter(loader)."""
    images, labels = _split(200)
    expected = ResidentBatches(images, labels, 16, shuffle=True, seed=3)
    expected.set_epoch(5)
    loader = ResidentBatches(images, labels, 16, shuffle=True, seed=3)
    batches = iter(loader)
    _set_sampler_epoch(loader, 5)
    assert torch.equal(torch.cat([batch["index"] for batch in batches]), _epoch(expected))
    assert torch.equal(_epoch(loader), _epoch(expected)), "both move on to epoch 6"


class _RecordsEpochOrders(L.LightningModule):
    """Trains a linear layer and records the patch order of every training epoch it runs."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(50 * 50 * 3, 2)
        self.images, self.labels = images, labels
        self.orders: dict[int, list[torch.Tensor]] = {}

    def _loader(self, train: bool) -> ResidentBatches:
        return ResidentBatches(self.images, self.labels, 8, shuffle=train, drop_last=train, seed=11)

    def train_dataloader(self) -> ResidentBatches:
        return self._loader(train=True)

    def val_dataloader(self) -> ResidentBatches:
        return self._loader(train=False)

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.layer(batch["image"].flatten(1).float() / 255)
        return torch.nn.functional.cross_entropy(logits, batch["label"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.orders.setdefault(self.current_epoch, []).append(batch["index"])
        return self._loss(batch)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(module: _RecordsEpochOrders, max_epochs: int, root: Path, ckpt_path: Path | None = None) -> L.Trainer:
    trainer = L.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, default_root_dir=root)
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def test_resumed_training_continues_the_epoch_orders(tmp_path: Path) -> None:
    """Epoch 2 resumed from a checkpoint sees the same patch order as epoch 2 of an uninterrupted run."""
    images, labels = _split(40)
    straight = _RecordsEpochOrders(images, labels)
    _fit(straight, max_epochs=3, root=tmp_path)
    orders = {epoch: torch.cat(batches) for epoch, batches in straight.orders.items()}
    assert sorted(orders) == [0, 1, 2] and not torch.equal(orders[0], orders[2])

    interrupted = _RecordsEpochOrders(images, labels)
    _fit(interrupted, max_epochs=2, root=tmp_path).save_checkpoint(tmp_path / "epoch2.ckpt")
    resumed = _RecordsEpochOrders(images, labels)
    _fit(resumed, max_epochs=3, root=tmp_path, ckpt_path=tmp_path / "epoch2.ckpt")
    assert sorted(resumed.orders) == [2]
    assert torch.equal(torch.cat(resumed.orders[2]), orders[2])


def test_weighted_sampling_draws_in_the_given_proportions() -> None:
    images, labels = _split(10_000, positive_every=10)
    class_balanced = 1.0 / torch.bincount(labels)[labels].double()
    loader = ResidentBatches(images, labels, 256, shuffle=True, sample_weights=class_balanced)
    index = _epoch(loader)
    assert len(index) == 10_000
    assert labels[index].float().mean().item() == pytest.approx(0.5, abs=0.03)
    with pytest.raises(ValueError, match="one sample weight per patch"):
        ResidentBatches(images, labels, 256, shuffle=True, sample_weights=class_balanced[:5])


def test_rejects_mismatched_inputs() -> None:
    images, labels = _split(10)
    with pytest.raises(ValueError, match="labels"):
        ResidentBatches(images, labels[:5], 4, shuffle=True)
    with pytest.raises(ValueError, match="rank"):
        ResidentBatches(images, labels, 4, shuffle=True, rank=2, world_size=2)


def test_fits_on_device() -> None:
    assert fits_on_device(1 << 20, torch.device("cpu"))
    assert not fits_on_device(1 << 60, torch.device("cpu"))
    if torch.cuda.is_available():
        assert fits_on_device(1 << 20, torch.device("cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_stay_on_device_without_host_sync() -> None:
    images, labels = (tensor.cuda() for tensor in _split(100))
    batches = iter(ResidentBatches(images, labels, 16, shuffle=True))
    torch.cuda.set_sync_debug_mode("error")
    try:
        batch = next(batches)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(tensor.is_cuda for tensor in batch.values())
