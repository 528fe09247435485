"""ResidentBatches: epoch coverage, rank sharding and reproducible orders without a DataLoader."""

from __future__ import annotations

import pytest
import torch

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


def test_balanced_sampling_draws_classes_equally() -> None:
    images, labels = _split(10_000, positive_every=10)
    loader = ResidentBatches(images, labels, 256, shuffle=True, balanced=True)
    index = _epoch(loader)
    assert len(index) == 10_000
    assert labels[index].float().mean().item() == pytest.approx(0.5, abs=0.03)


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
    batches = iter(ResidentBatches(images, labels, 16, shuffle=True))  # one copy of the epoch order
    torch.cuda.set_sync_debug_mode("error")
    try:
        batch = next(batches)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(tensor.is_cuda for tensor in batch.values())
