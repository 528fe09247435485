"""GPU mode (benchmarks/gpu.sh): generate the full-scale set with every core, pack its cache, then the rows of
`gpu_cases` until the time budget ends. `--dry-run` is the same path on the CPU with a tiny set and tiny sizes."""

from __future__ import annotations

import argparse
import importlib.util
import os
import time

import torch

from idc_lightning.bench.builds import measure_builds, measure_synthetic
from idc_lightning.bench.gpu_cases import GpuSettings, measure_gpu
from idc_lightning.bench.report import Row
from idc_lightning.data.synthetic import SyntheticSlides

GPU_BATCH = 256
DRY_RUN_BATCH = 8
# The whole-slide row: level-0 side of its synthetic scan, what it imports beyond the GPU path, a time guess.
SLIDE_SIDE = 40_000
DRY_RUN_SLIDE_SIDE = 4_000
SLIDE_MODULES = ("openslide", "shapely", "tifffile", "matplotlib")
SLIDE_ALLOWANCE_S = 240.0


def gpu_settings(args: argparse.Namespace, deadline: float) -> GpuSettings:
    workers = args.workers or os.cpu_count() or 1
    if args.dry_run:
        return GpuSettings(device=torch.device("cpu"), batch=DRY_RUN_BATCH, large_size=64, seconds=args.seconds,
                           warmup_steps=1, workers=1, deadline=deadline, compile=False)
    if not torch.cuda.is_available():
        raise SystemExit(f"--gpu needs a CUDA device, but torch {torch.__version__} (built for CUDA "
                         f"{torch.version.cuda}) sees none on this machine; use --dry-run to test this path on a CPU")
    return GpuSettings(device=torch.device("cuda"), batch=GPU_BATCH, large_size=224, seconds=args.seconds,
                       warmup_steps=5, workers=workers, deadline=deadline, compile=True)


def _whole_slide(args: argparse.Namespace, settings: GpuSettings, skipped: list[str]) -> list[Row]:
    """`predict` on a synthetic scan, on the device; skipped (and listed) when the time or a module is missing."""
    side = DRY_RUN_SLIDE_SIDE if args.dry_run else SLIDE_SIDE
    missing = [module for module in SLIDE_MODULES if importlib.util.find_spec(module) is None]
    name = f"whole slide {side:,} px"
    if missing:
        skipped.append(f"{name} (this Python lacks {', '.join(missing)}; carry their wheels to run it)")
        return []
    if time.monotonic() + (0 if args.dry_run else SLIDE_ALLOWANCE_S) > settings.deadline:
        skipped.append(f"{name} (would end past the time budget)")
        return []
    from idc_lightning.bench.whole_slide import run_whole_slide

    section = "whole slide (cpu dry run)" if args.dry_run else "whole slide (gpu)"
    return run_whole_slide(args.data_dir, (side,), settings.device, settings.workers, section)


def run_gpu(args: argparse.Namespace, deadline: float) -> tuple[list[Row], list[str]]:
    settings = gpu_settings(args, deadline)
    started = time.monotonic()
    slides = SyntheticSlides(num_patients=args.patients, seed=0, grid_min=args.grid_min, grid_max=args.grid_max,
                             workers=args.workers)
    synthetic_row, root = measure_synthetic(slides, args.data_dir)
    build_rows, cache = measure_builds("synthetic", root, args.data_dir / "cache", args.workers)
    rows, skipped = measure_gpu(cache, settings)
    rows = [synthetic_row, *build_rows, *rows, *_whole_slide(args, settings, skipped)]
    used = time.monotonic() - started
    notes = [
        "Dry run: the GPU path on the CPU with a tiny set and tiny sizes, to test the code, not to measure it"
        if args.dry_run else f"Device: {torch.cuda.get_device_name()}",
        f"Set: {len(cache.rows):,} synthetic patches of {args.patients} patients (grid {args.grid_min}.."
        f"{args.grid_max} cells), generated and packed with {slides.workers or os.cpu_count()} processes",
        f"Training: batch {settings.batch}, ResNet-18 (IDCClassifier, not pretrained, channels_last), AdamW, "
        "cross-entropy, augmentation by BatchAugment (on the device unless the path says otherwise); inference: "
        "normalisation and forward under no_grad",
        f"Timing: {settings.warmup_steps} warm-up steps (torch.compile happens there), then {settings.seconds:g} s "
        "of steady state per row; the epoch seconds are extrapolated from that rate to the whole set, not an "
        "epoch run end to end",
        "Data paths: `GPU-resident` = the whole uint8 set on the device, batches by ResidentBatches "
        "(data.loader=gpu_resident); `device aug` = uint8 batches from the packed cache by a DataLoader with "
        f"{settings.workers} workers, augmented on the device (data.augment_on=device); `DataLoader` = the same "
        "loader whose workers augment on the CPU (BatchAugment as collate_fn: albumentations is not on the lent "
        "GPU machine; `make bench` compares the two on a CPU)",
        "Device memory: the peak allocated by a row on top of the resident set and what earlier rows left",
        f"Time budget {args.budget:g} s from the start of the process; this run used {used:.0f} s after start-up",
        f"Skipped: {'; '.join(skipped)}" if skipped else "Skipped: none",
    ]
    return rows, notes
