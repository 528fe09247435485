"""GPU mode (benchmarks/gpu.sh): train/inference img/s of model variants, and of three ways of feeding the GPU."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from idc_lightning.bench.report import Row
from idc_lightning.data.augment_config import AugmentConfig
from idc_lightning.data.cache import PatchCache
from idc_lightning.data.datasets import PatchBatchDataset, PatchDataset, keep_batch
from idc_lightning.data.device_augment import BatchAugment
from idc_lightning.data.transforms import train_transform
from idc_lightning.models.classifier import IDCClassifier


def _gpu_model(image_size: int, channels_last: bool, compile_: bool) -> IDCClassifier:
    model = IDCClassifier(optimizer=partial(torch.optim.AdamW, lr=1e-3), pretrained=False, class_weights=None,
                          channels_last=channels_last, compile=compile_).cuda()
    model.configure_model()
    return model


def _resident_source(images: torch.Tensor, labels: torch.Tensor, batch: int) -> Iterator[dict[str, torch.Tensor]]:
    while True:
        index = torch.randint(len(images), (batch,), device=images.device)
        yield {"image": images[index], "label": labels[index]}


def _loader_source(loader: DataLoader) -> Iterator[dict[str, torch.Tensor]]:
    while True:
        for batch in loader:
            yield {key: value.cuda(non_blocking=True) for key, value in batch.items()}


def gpu_rate(model: IDCClassifier, source: Iterator[dict[str, torch.Tensor]], augment: BatchAugment | None,
             train: bool, bf16: bool, seconds: float) -> float:
    """img/s of train steps (or no-grad inference) over `seconds` after warm-up (compile happens in warm-up)."""
    optimizer = model.configure_optimizers()["optimizer"]
    model.train(train)
    seen, started = 0, None
    for step, batch in enumerate(source, start=1):
        images = augment(batch["image"], train=train) if augment is not None else batch["image"]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16), torch.set_grad_enabled(train):
            logits = model(images)
            if train:
                loss = F.cross_entropy(logits.float(), batch["label"])
        if train:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if step == 5:
            torch.cuda.synchronize()
            started = time.perf_counter()
        elif step > 5:
            seen += len(images)
            if step % 10 == 0:
                torch.cuda.synchronize()
                if time.perf_counter() - started >= seconds:
                    return seen / (time.perf_counter() - started)
    raise RuntimeError("the batch source ended early")


def measure_gpu(cache: PatchCache, seconds: float, batch: int = 256) -> list[Row]:
    """Model variants on gpu-resident data, then the three ways of feeding one variant."""
    torch.backends.cudnn.benchmark = True
    images = torch.from_numpy(np.asarray(cache.images[cache.rows["cache_index"].to_numpy()])).cuda()
    labels = torch.as_tensor(cache.rows["label"].to_numpy(np.int64)).cuda()
    epoch = f"epoch of {len(labels)} patches ~ {{:.0f}} s"
    rows: list[Row] = []
    # (name, image_size, channels_last, compile, bf16)
    variants = [
        ("eager fp32 50px", 50, False, False, False),
        ("eager bf16 50px", 50, False, False, True),
        ("eager bf16 50px channels_last", 50, True, False, True),
        ("compile bf16 50px channels_last", 50, True, True, True),
        ("eager fp32 224px", 224, False, False, False),
        ("eager bf16 224px channels_last", 224, True, False, True),
        ("compile bf16 224px channels_last", 224, True, True, True),
    ]
    for name, size, channels_last, compile_, bf16 in variants:
        augment = BatchAugment(AugmentConfig(), image_size=size, channels_last=channels_last).cuda()
        for train in (True, False):
            model = _gpu_model(size, channels_last, compile_)
            rate = gpu_rate(model, _resident_source(images, labels, batch), augment, train, bf16, seconds)
            mode = "train" if train else "inference"
            rows.append(Row(f"gpu {mode} (gpu-resident data)", name, rate, "img/s", epoch.format(len(labels) / rate)))
    for name, source, augment in _gpu_sources(cache, images, labels, batch):
        rate = gpu_rate(_gpu_model(50, True, False), source, augment, True, True, seconds)
        rows.append(Row("gpu train by data path (eager bf16 50px channels_last)", name, rate, "img/s",
                        epoch.format(len(labels) / rate)))
    return rows


def _gpu_sources(cache: PatchCache, images: torch.Tensor, labels: torch.Tensor,
                 batch: int) -> list[tuple[str, Iterator[dict[str, torch.Tensor]], BatchAugment | None]]:
    workers = min(8, os.cpu_count() or 1)
    config = AugmentConfig()
    path, shape = cache.folder / "images.u8", cache.images.shape
    cpu_aug = DataLoader(PatchDataset(path, shape, cache.rows, train_transform(config)), batch_size=batch,
                         shuffle=True, num_workers=workers, pin_memory=True, persistent_workers=True)
    uint8 = DataLoader(PatchBatchDataset(path, shape, cache.rows), batch_size=batch, shuffle=True,
                       num_workers=workers, pin_memory=True, persistent_workers=True, collate_fn=keep_batch)
    augment = BatchAugment(config, channels_last=True).cuda()
    return [
        (f"cpu-aug DataLoader ({workers} workers)", _loader_source(cpu_aug), None),
        (f"device aug (uint8 DataLoader, {workers} workers)", _loader_source(uint8), augment),
        ("gpu-resident (random index batches)", _resident_source(images, labels, batch), augment),
    ]
