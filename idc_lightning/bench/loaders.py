"""Model-ready patches/s and peak memory of the loader paths, over the same random rows of one cache."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from idc_lightning.bench.memory import PeakMemory, tree_memory_mib
from idc_lightning.bench.report import Row
from idc_lightning.data.augment_config import AugmentConfig
from idc_lightning.data.cache import PatchCache
from idc_lightning.data.datasets import PatchBatchDataset, PatchDataset, keep_batch
from idc_lightning.data.device_augment import BatchAugment
from idc_lightning.data.transforms import train_transform
from idc_lightning.preprocessing import PATCH_SIZE

LOADER_BATCH = 256
LOADER_WORKERS = 2
WARMUP_BATCHES = 2
SUBSET = 20_000  # random patches the loader paths read; big enough that no path re-reads a warm page cache early
# Intra-op threads of the main process when it augments: the cores the loader workers leave. More OpenMP threads
# than free cores spin at every op's barrier while a worker holds the core (measured ~8x slower on 2 CPUs).
MAIN_THREADS = max(1, (os.cpu_count() or 1) - LOADER_WORKERS)


def images_per_second(batches: Iterable[dict[str, torch.Tensor]], seconds: float,
                      consume: Callable[[dict[str, torch.Tensor]], None]) -> float:
    """Patches/s over `seconds` after WARMUP_BATCHES (worker start-up and first reads excluded); loops epochs."""
    seen, started = 0, None
    warm = 0
    while True:
        for batch in batches:
            consume(batch)
            if started is None:
                warm += 1
                if warm >= WARMUP_BATCHES:
                    started = time.perf_counter()
                continue
            seen += len(batch["label"])
            if time.perf_counter() - started >= seconds:
                return seen / (time.perf_counter() - started)


class PILPatchDataset(Dataset):
    """The usual way: open each PNG with PIL per item, then the albumentations transform."""

    def __init__(self, root: Path, frame: pd.DataFrame, transform: Callable) -> None:
        self.paths = [str(root / path) for path in frame["path"]]
        self.labels = torch.as_tensor(frame["label"].to_numpy(np.int64))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        with Image.open(self.paths[position]) as image:
            patch = np.asarray(image.convert("RGB"))
        if patch.shape[:2] != (PATCH_SIZE, PATCH_SIZE):
            # slide-edge patches are smaller: pad like glass, as the cache does, so batches stack
            padded = np.full((PATCH_SIZE, PATCH_SIZE, 3), 255, np.uint8)
            padded[: patch.shape[0], : patch.shape[1]] = patch
            patch = padded
        image = self.transform(image=patch)["image"]
        return {"image": image, "label": self.labels[position], "index": torch.tensor(position)}


def _loader(dataset: Dataset, batched: bool, collate: Callable | None = None) -> DataLoader:
    return DataLoader(dataset, batch_size=LOADER_BATCH, shuffle=True, num_workers=LOADER_WORKERS,
                      persistent_workers=True, collate_fn=collate or (keep_batch if batched else None))


class _AugmentInWorker:
    """collate_fn that runs BatchAugment in the loader worker, on the uint8 batch PatchBatchDataset read."""

    def __init__(self, augment: BatchAugment) -> None:
        self.augment = augment

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**batch, "image": self.augment(batch["image"], train=True)}


class LoaderPath(NamedTuple):
    """A loader factory, what the training step does with a batch before the model, and the main process's
    intra-op threads meanwhile (None: torch's default)."""

    make_loader: Callable[[], DataLoader]
    consume: Callable[[dict[str, torch.Tensor]], None]
    main_threads: int | None = None


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count or previous)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def loader_paths(root: Path, cache: PatchCache, frame: pd.DataFrame) -> dict[str, LoaderPath]:
    """The paths to compare, by name, over the same rows; factories, so only one path's workers are alive while
    it is measured. The batch-augment path is the DataModule's `augment_on: device` on a CPU: one fancy-indexed
    memmap read per batch in the workers, BatchAugment in the main process (on_after_batch_transfer)."""
    augment = AugmentConfig()
    device_augment = BatchAugment(augment)
    images_path, shape = cache.folder / "images.u8", cache.images.shape

    def device_side(batch: dict[str, torch.Tensor]) -> None:
        device_augment(batch["image"], train=True)

    def ready(batch: dict[str, torch.Tensor]) -> None:
        return None

    return {
        "PIL per file + albumentations": LoaderPath(
            lambda: _loader(PILPatchDataset(root, frame, train_transform(augment)), batched=False), ready),
        "cache + albumentations": LoaderPath(
            lambda: _loader(PatchDataset(images_path, shape, frame, train_transform(augment)), batched=False), ready),
        "cache + batch augment (CPU)": LoaderPath(
            lambda: _loader(PatchBatchDataset(images_path, shape, frame), batched=True), device_side, MAIN_THREADS),
        "cache + batch augment in workers (CPU)": LoaderPath(
            lambda: _loader(PatchBatchDataset(images_path, shape, frame), batched=True,
                            collate=_AugmentInWorker(device_augment)), ready),
    }


def augment_alone_rate(cache: PatchCache, frame: pd.DataFrame, seconds: float) -> float:
    """BatchAugment on in-memory uint8 batches in this process: the ceiling of the device-aug path on CPU."""
    augment = BatchAugment(AugmentConfig())
    images = torch.from_numpy(np.asarray(cache.images[frame["cache_index"].to_numpy()[:LOADER_BATCH]]))
    batch = {"image": images, "label": torch.zeros(len(images))}
    with torch_threads(MAIN_THREADS):
        return images_per_second([batch] * 4, seconds, lambda b: augment(b["image"], train=True))


def measure_loaders(label: str, root: Path, cache: PatchCache, seconds: float, seed: int = 0) -> list[Row]:
    frame = cache.rows.sample(n=min(SUBSET, len(cache.rows)), random_state=seed).reset_index(drop=True)
    results: list[Row] = []
    baseline = None
    for name, (make_loader, consume, main_threads) in loader_paths(root, cache, frame).items():
        loader = make_loader()
        idle = tree_memory_mib()
        with PeakMemory() as memory, torch_threads(main_threads):
            rate = images_per_second(loader, seconds, consume)
        del loader  # its persistent workers exit before the next path starts its own
        baseline = baseline or rate
        results.append(Row(f"loader ({label})", name, rate, "patches/s", f"{rate / baseline:.2f}x PIL"))
        peak = memory.peak
        results.append(Row(f"memory ({label})", name, peak["pss_anon"], "MiB",
                           f"+{peak['pss_anon'] - idle['pss_anon']:.0f} MiB anonymous over the idle main process; "
                           f"total PSS incl. mapped files {peak['pss']:.0f} MiB "
                           f"(+{peak['pss'] - idle['pss']:.0f})"))
    rate = augment_alone_rate(cache, frame, seconds)
    results.append(Row(f"loader ({label})", "batch augment alone (CPU, no loader)", rate, "patches/s",
                       f"{rate / baseline:.2f}x PIL; BatchAugment on ready uint8 batches in the main process, "
                       f"{MAIN_THREADS} thread{'s' if MAIN_THREADS > 1 else ''}"))
    return results
