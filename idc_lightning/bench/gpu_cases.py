"""The GPU mode's rows: seconds per full-set training epoch and inference img/s, inside a time budget.

Each row is time-boxed: warm-up steps (torch.compile happens there), then steady-state img/s over a few seconds,
from which the seconds of one epoch over the whole set are extrapolated. Rows run cheapest first and a row that
would end past the deadline is skipped and listed, so one call of the lent GPU machine never overruns. The dry
run (`--dry-run`) runs the same rows on the CPU with tiny sizes, so this path is tested without a GPU.
Nothing here imports albumentations: the lent GPU machine does not have it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from idc_lightning.bench.report import Row
from idc_lightning.data.augment_config import AugmentConfig
from idc_lightning.data.cache import IMAGES_FILE, PatchCache
from idc_lightning.data.datasets import PatchBatchDataset, keep_batch
from idc_lightning.data.device_augment import BatchAugment
from idc_lightning.data.gpu_resident import ResidentBatches
from idc_lightning.models.classifier import IDCClassifier

Batch = dict[str, torch.Tensor]
# A conservative guess of what a torch.compile row adds to its warm-up (ResNet-18, fwd+bwd) on the first call.
COMPILE_ALLOWANCE_S = 90.0
DATA_PATHS = ("DataLoader", "device aug", "GPU-resident")


@dataclass(frozen=True)
class GpuSettings:
    """How big and how long: the GPU run's defaults, or the dry run's tiny ones on the CPU."""

    device: torch.device
    batch: int
    large_size: int  # the upsampled input size (224 on the GPU; small in the dry run)
    seconds: float  # steady-state time box of each row
    warmup_steps: int
    workers: int  # DataLoader workers of the two loader paths
    deadline: float  # time.monotonic() past which no row starts and a running one stops
    compile: bool  # False: the torch.compile rows are listed as skipped (the CPU dry run)


@dataclass(frozen=True)
class Case:
    """One row: how batches reach the model, train or inference, input size, precision, eager or compiled."""

    path: str  # one of DATA_PATHS
    train: bool
    size: int
    bf16: bool
    compile: bool

    @property
    def section(self) -> str:
        return "gpu train" if self.train else "gpu inference"

    @property
    def name(self) -> str:
        return f"{self.path} {'compile' if self.compile else 'eager'} {'bf16' if self.bf16 else 'fp32'} {self.size}px"


def plan(settings: GpuSettings) -> list[Case]:
    """Cheapest first, torch.compile last: a deadline then cuts the dearest rows, not the baseline ones."""
    small, large = 50, settings.large_size
    resident = "GPU-resident"
    return [
        Case(resident, True, small, False, False),
        Case(resident, True, small, True, False),
        Case("DataLoader", True, small, True, False),
        Case("device aug", True, small, True, False),
        Case(resident, False, small, False, False),
        Case(resident, False, small, True, False),
        Case(resident, True, large, False, False),
        Case(resident, True, large, True, False),
        Case(resident, False, large, True, False),
        Case(resident, True, small, True, True),
        Case(resident, False, small, True, True),
        Case(resident, True, large, True, True),
    ]


class _AugmentInWorker:
    """collate_fn of the DataLoader path: the loader workers augment on the CPU, the GPU only trains.
    BatchAugment stands in for albumentations, which the lent GPU machine lacks; `make bench` compares the two."""

    def __init__(self, augment: BatchAugment) -> None:
        self.augment = augment

    def __call__(self, batch: Batch) -> Batch:
        return {"image": self.augment(batch["image"], train=True), "label": batch["label"]}


def _loader_batches(loader: DataLoader, device: torch.device) -> Iterator[Batch]:
    while True:
        for batch in loader:
            yield {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def _resident_batches(resident: ResidentBatches) -> Iterator[Batch]:
    while True:
        yield from resident


def batch_source(case: Case, cache: PatchCache, resident: ResidentBatches,
                 settings: GpuSettings) -> tuple[Iterator[Batch], BatchAugment | None]:
    """Batches on the device and the augmentation the step applies (None: they come augmented)."""
    augment = BatchAugment(AugmentConfig(), image_size=case.size, channels_last=True)
    if case.path == "GPU-resident":
        return _resident_batches(resident), augment.to(settings.device)
    dataset = PatchBatchDataset(cache.folder / IMAGES_FILE, cache.images.shape, cache.rows)
    on_cuda = settings.device.type == "cuda"
    loader_options = {"batch_size": settings.batch, "shuffle": True, "num_workers": settings.workers,
                      "pin_memory": on_cuda, "persistent_workers": settings.workers > 0, "drop_last": True}
    if case.path == "DataLoader":
        loader = DataLoader(dataset, collate_fn=_AugmentInWorker(augment), **loader_options)
        return _loader_batches(loader, settings.device), None
    loader = DataLoader(dataset, collate_fn=keep_batch, **loader_options)
    return _loader_batches(loader, settings.device), augment.to(settings.device)


def _model(case: Case, device: torch.device) -> IDCClassifier:
    model = IDCClassifier(optimizer=partial(torch.optim.AdamW, lr=1e-3), pretrained=False, class_weights=None,
                          channels_last=True, compile=case.compile)
    model.configure_model()
    return model.to(device).train(case.train)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Measurement:
    rate: float  # img/s in steady state
    warmup_s: float  # warm-up steps, compilation included
    peak_gib: float | None  # device memory allocated by the row on top of what was there before (None on CPU)
    cut_short: bool  # stopped by the deadline before its time box ended


def measure_case(case: Case, source: Iterator[Batch], augment: BatchAugment | None,
                 settings: GpuSettings) -> Measurement:
    """Warm-up steps, then steps until the time box (or the deadline) ends; the host runs ahead of the GPU, so
    the clock is read after a synchronize."""
    device = settings.device
    model = _model(case, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3) if case.train else None
    on_cuda = device.type == "cuda"
    if on_cuda:
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    warmup_started = time.perf_counter()
    started, warmup_s, seen, cut_short = 0.0, 0.0, 0, False
    for step, batch in enumerate(source, start=1):
        images = augment(batch["image"], train=case.train) if augment is not None else batch["image"]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=case.bf16), torch.set_grad_enabled(case.train):
            logits = model(images)
        if optimizer is not None:
            loss = F.cross_entropy(logits.float(), batch["label"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if step == settings.warmup_steps:
            _synchronize(device)
            started = time.perf_counter()
            warmup_s = started - warmup_started
        elif step > settings.warmup_steps:
            seen += len(images)
            cut_short = time.monotonic() >= settings.deadline
            if time.perf_counter() - started >= settings.seconds or cut_short:
                break
    _synchronize(device)
    rate = seen / (time.perf_counter() - started)
    peak = (torch.cuda.max_memory_allocated(device) - baseline) / 2**30 if on_cuda else None
    return Measurement(rate, warmup_s, peak, cut_short)


def _estimated_seconds(case: Case, settings: GpuSettings) -> float:
    return settings.seconds + 10 + (COMPILE_ALLOWANCE_S if case.compile else 0)


def _row(case: Case, result: Measurement, epoch_patches: int) -> Row:
    notes = [f"warm-up {result.warmup_s:.1f} s"]
    if case.train:
        notes.insert(0, f"epoch of {epoch_patches:,} patches ~ {epoch_patches / result.rate:,.0f} s (extrapolated)")
    if result.peak_gib is not None:
        notes.append(f"peak +{result.peak_gib:.1f} GiB device memory")
    if result.cut_short:
        notes.append("cut short by the deadline")
    return Row(case.section, case.name, result.rate, "img/s", "; ".join(notes))


def measure_gpu(cache: PatchCache, settings: GpuSettings) -> tuple[list[Row], list[str]]:
    """The planned rows that fit before the deadline, and the names of those skipped (with why)."""
    if settings.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if len(cache.rows) < settings.batch:
        raise ValueError(f"the set has {len(cache.rows)} patches, fewer than one batch of {settings.batch}: "
                         "generate more patients (--patients) or lower the batch")
    index = cache.rows["cache_index"].to_numpy()
    images = torch.from_numpy(np.asarray(cache.images[index])).to(settings.device)
    labels = torch.as_tensor(cache.rows["label"].to_numpy(np.int64)).to(settings.device)
    resident = ResidentBatches(images, labels, settings.batch, shuffle=True, drop_last=True)
    rows = [Row("gpu memory", "resident patch set", images.nbytes / 2**20, "MiB",
                f"{len(images):,} uint8 patches on {settings.device.type}")]
    skipped: list[str] = []
    for case in plan(settings):
        if case.compile and not settings.compile:
            skipped.append(f"{case.section} {case.name} (torch.compile is not tried in the CPU dry run)")
            continue
        if time.monotonic() + _estimated_seconds(case, settings) > settings.deadline:
            skipped.append(f"{case.section} {case.name} (would end past the time budget)")
            continue
        source, augment = batch_source(case, cache, resident, settings)
        rows.append(_row(case, measure_case(case, source, augment, settings), len(images)))
        del source  # a loader path's workers exit before the next row starts its own
    return rows, skipped
