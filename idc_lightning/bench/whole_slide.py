"""Whole-slide rows: `predict`'s tiles/s and peak memory on a synthetic scan (level 0 at 0.25 um/px, three
levels, written by slides.scan_writer), and the share of that time the model itself takes.

Two sizes show what the slide's size adds to memory: read windows and the thumbnail are bounded, only the
per-tile results grow.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path

import cv2
import lightning as L
import numpy as np
import torch

from idc_lightning.bench.memory import PeakMemory, tree_memory_mib
from idc_lightning.bench.report import Row
from idc_lightning.data.slide_painter import render_slide
from idc_lightning.models.classifier import IDCClassifier
from idc_lightning.preprocessing import Preprocessing
from idc_lightning.slides.pipeline import SlideSettings, predict_slide
from idc_lightning.slides.scan_writer import UPSAMPLE, write_scan

log = logging.getLogger(__name__)

# Equal, full batches on both slide sizes, so a memory difference between them is what the slide adds.
BATCH = 64


def synthetic_scan(folder: Path, side: int, seed: int = 0) -> Path:
    """A `side` x `side` px level-0 scan of painted tissue (reused when present: writing 40k x 40k takes minutes)."""
    path = folder / f"scan_{side}px_s{seed}.svs"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    working = side // UPSAMPLE
    painted = render_slide(np.random.default_rng(seed), working, working, idc_target=0.3, tissue_fraction=0.5,
                           border_noise=0.35)
    image = np.full((working, working, 3), 255, np.uint8)
    height, width = painted.bgr.shape[:2]
    image[painted.top : painted.top + height, painted.left : painted.left + width] = cv2.cvtColor(
        painted.bgr, cv2.COLOR_BGR2RGB)
    partial_path = path.with_suffix(".partial.svs")
    write_scan(image, partial_path)
    return partial_path.rename(path)


def _settings(workers: int) -> SlideSettings:
    trained = Preprocessing()
    return SlideSettings(patch_size=trained.patch_size, image_size=trained.image_size, mean=trained.mean,
                         std=trained.std, pad_value=trained.pad_value, microns_per_pixel=trained.microns_per_pixel,
                         stain_reference=None, stride=trained.patch_size, min_tissue=0.5, max_saturation_threshold=20,
                         mpp=None, batch_size=BATCH, num_workers=workers, threshold=0.5)


class _ModelClock(L.Callback):
    """Seconds inside predict_step (the forward), measured in the same run as the end-to-end time."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started = 0.0

    def on_predict_batch_start(self, trainer: L.Trainer, module: L.LightningModule, *args: object) -> None:
        self._started = time.perf_counter()

    def on_predict_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: object) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - self._started


def measure_whole_slide(scan: Path, out_dir: Path, device: torch.device, workers: int = 0,
                        section: str = "whole slide (cpu)") -> list[Row]:
    """predict_slide end to end (thumbnail, tissue, streamed tiles, GeoJSON, overlay) on `scan`."""
    torch.manual_seed(0)
    model = IDCClassifier(optimizer=partial(torch.optim.AdamW, lr=1e-3), pretrained=False, class_weights=None,
                          channels_last=False, compile=False)
    clock = _ModelClock()
    trainer = L.Trainer(accelerator=device.type, devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[clock])
    settings = _settings(workers)
    out_dir.mkdir(parents=True, exist_ok=True)
    idle = tree_memory_mib()["pss_anon"]
    with PeakMemory() as peak:
        started = time.perf_counter()
        row, _ = predict_slide(trainer, model, settings, scan, out_dir, scan.stem)
        seconds = time.perf_counter() - started
    tiles = int(row["tiles"])
    name = f"{scan.stem.split('_')[1]} level 0"
    log.info("%s: %d tiles in %.1f s, peak Pss_Anon %.0f MiB", scan, tiles, seconds, peak.peak["pss_anon"])
    return [
        Row(section, f"predict tiles/s, {name}", tiles / seconds, "tiles/s",
            f"{tiles:,} tissue tiles in {seconds:.1f} s end to end, batch {settings.batch_size}"),
        Row(section, f"model share, {name}", 100 * clock.seconds / seconds, "%",
            "time in predict_step (the forward) of the end-to-end time; reading, resizing and normalising the "
            "tiles run in the loader"),
        Row(section, f"peak memory, {name}", peak.peak["pss_anon"], "MiB",
            f"Pss_Anon of the process during predict (+{peak.peak['pss_anon'] - idle:.0f} over idle); total PSS "
            f"{peak.peak['pss']:.0f} MiB"),
    ]


def run_whole_slide(data_dir: Path, sides: tuple[int, ...], device: torch.device, workers: int = 0,
                    section: str = "whole slide (cpu)") -> list[Row]:
    rows = []
    for side in sides:
        rows += measure_whole_slide(synthetic_scan(data_dir / "scans", side), data_dir / "scans_out", device, workers,
                                    section)
    return rows
