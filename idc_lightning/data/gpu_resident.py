"""`data.loader: gpu_resident`: keep the split's patches on the device and index batches there.

50x50x3 uint8 patches are 7.5 kB each, so even the full set (~2.1 GB) fits on one GPU; batches are then a
single gather with no workers, pinned memory or host-to-device copies. Indices are drawn on the CPU from a
generator seeded with (seed, epoch), so every rank computes the same epoch order without communicating.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import psutil
import torch


class EpochSetter:
    """What Lightning finds as a loader's `.sampler`: its fit loop calls `sampler.set_epoch(current_epoch)`
    before every epoch, also the first one after resuming from a checkpoint; this passes it to the batches.
    """

    def __init__(self, batches: ResidentBatches) -> None:
        self._batches = batches

    def set_epoch(self, epoch: int) -> None:
        self._batches.set_epoch(epoch)


class ResidentBatches:
    """Iterable of {"image": uint8 [B,H,W,3], "label": int64 [B], "index": int64 [B]} batches.

    `index` is the row position within this split. Each rank takes every `world_size`-th element of the
    epoch's order, padded by wrapping (like DistributedSampler) so all ranks run the same number of batches.
    `sample_weights` (one per patch, any scale) draws N patches with replacement in those proportions instead of a
    permutation (data.sampler balanced or patient).
    The epoch is the one last given to `set_epoch` (Lightning's, through `sampler`), or the one after the
    previous epoch's when nobody calls it. It is read at an epoch's first batch, not at `iter()`: Lightning
    creates the first epoch's iterator before it calls `set_epoch`.
    """

    # Lightning's `_is_dataloader_shuffled` reads `batch_sampler` of anything that has a `sampler`.
    batch_sampler = None

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        shuffle: bool,
        sample_weights: torch.Tensor | None = None,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ) -> None:
        if len(images) == 0 or len(images) != len(labels):
            raise ValueError(f"need as many labels as patches (> 0), got {len(images)} and {len(labels)}")
        if images.device != labels.device:
            raise ValueError(f"images on {images.device} but labels on {labels.device}: copy both to one device")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.images = images
        self.labels = labels.long()
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self._next_epoch = 0
        self.sampler = EpochSetter(self)
        if sample_weights is not None and sample_weights.shape != (len(labels),):
            raise ValueError(f"need one sample weight per patch ({len(labels)}), "
                             f"got shape {tuple(sample_weights.shape)}")
        self.sample_weights = None if sample_weights is None else sample_weights.detach().cpu().double()

    def set_epoch(self, epoch: int) -> None:
        self._next_epoch = epoch

    def _shard_size(self) -> int:
        return math.ceil(len(self.labels) / self.world_size)

    def __len__(self) -> int:
        full = self._shard_size() // self.batch_size
        # Like the DataLoader path: drop the partial batch only if a full one remains, never a whole epoch.
        return full if self.drop_last and full else math.ceil(self._shard_size() / self.batch_size)

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        n = len(self.labels)
        generator = torch.Generator().manual_seed(self.seed + epoch)
        if self.sample_weights is not None:
            return torch.multinomial(self.sample_weights, n, replacement=True, generator=generator)
        if self.shuffle:
            return torch.randperm(n, generator=generator)
        return torch.arange(n)

    def _shard(self, order: torch.Tensor) -> torch.Tensor:
        padded_size = self._shard_size() * self.world_size
        padded = order.repeat(math.ceil(padded_size / len(order)))[:padded_size]
        return padded[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch, self._next_epoch = self._next_epoch, self._next_epoch + 1
        shard = self._shard(self._epoch_order(epoch))
        # Pinned and non-blocking, so copying the epoch's order never waits for the device.
        if self.images.device.type == "cuda":
            shard = shard.pin_memory()
        shard = shard.to(self.images.device, non_blocking=True)
        for batch in range(len(self)):
            index = shard[batch * self.batch_size : (batch + 1) * self.batch_size]
            yield {"image": self.images[index], "label": self.labels[index], "index": index}


def fits_on_device(nbytes: int, device: torch.device, headroom: float = 0.8) -> bool:
    """Whether `nbytes` fits in `headroom` of the device's free memory (host RAM for CPU and MPS)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = psutil.virtual_memory().available
    return nbytes <= headroom * free
