"""CPU mode (`make bench`): manifest and cache build times, model-ready patches/s and peak memory of four loader
paths (albumentations among them), and Lightning's overhead over a bare PyTorch loop.

Memory is sampled every 0.2 s during each measurement from Linux's /proc/PID/smaps_rollup, summed over this process
and its DataLoader workers: Pss_Anon (heap, decoded arrays, tensors; what the path really costs) and the total PSS,
which adds mapped files (the memmap's page-cache pages, split between the processes that map them; reclaimable).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from idc_lightning.bench.builds import measure_builds, measure_synthetic
from idc_lightning.bench.loaders import (
    LOADER_BATCH,
    LOADER_WORKERS,
    MAIN_THREADS,
    SUBSET,
    WARMUP_BATCHES,
    measure_loaders,
)
from idc_lightning.bench.report import Row
from idc_lightning.bench.training import measure_training
from idc_lightning.bench.whole_slide import run_whole_slide
from idc_lightning.data.synthetic import SyntheticSlides

# Level-0 sides of the synthetic whole-slide scans (0.25 um/px): both fill the read windows to their bound, so
# their peak memories show what the slide's size adds.
SLIDE_SIDES = (20_000, 40_000)
QUICK_SLIDE_SIDES = (4_000,)


def _load_average() -> str:
    return ", ".join(f"{load:.1f}" for load in os.getloadavg())


def describe_sample(path: Path, patients: int) -> str:
    """Where the real sample is, relative to the working directory: docs must not name one machine's paths."""
    return f"{os.path.relpath(path)} ({patients} patients)"


def run_cpu(args: argparse.Namespace) -> tuple[list[Row], list[str]]:
    load_before = _load_average()
    slides = SyntheticSlides(num_patients=args.patients, seed=0, grid_min=args.grid_min, grid_max=args.grid_max,
                             workers=args.workers)
    synthetic_row, root = measure_synthetic(slides, args.data_dir)
    build_rows, cache = measure_builds("synthetic", root, args.data_dir / "cache", args.workers)
    rows = [synthetic_row, *build_rows]
    real = args.real if args.real is not None and args.real.is_dir() else None
    real_cache = None
    if real is not None:
        real_rows, real_cache = measure_builds("real sample", real, args.data_dir / "cache_real", args.workers)
        rows += real_rows
    rows += measure_loaders("synthetic", root, cache, args.seconds)
    if real_cache is not None:
        rows += measure_loaders("real sample", real, real_cache, args.seconds)
    rows += measure_training(cache, args.train_steps)
    sides = QUICK_SLIDE_SIDES if args.quick else SLIDE_SIDES
    rows += run_whole_slide(args.data_dir, sides, torch.device("cpu"))
    sample = "absent (skipped)"
    if real_cache is not None:
        sample = describe_sample(real, real_cache.rows["patient_id"].nunique())
    notes = [
        f"Synthetic set: {args.patients} patients, grid {args.grid_min}..{args.grid_max} cells, in {args.data_dir}",
        f"Real sample: {sample}",
        f"Loader paths: batch {LOADER_BATCH}, {LOADER_WORKERS} workers, shuffled random subset of up to "
        f"{SUBSET} patches, {args.seconds:g} s each after {WARMUP_BATCHES} warm-up batches; the page cache is "
        "warm after the cache build, so these are read-from-RAM numbers",
        "Batch augment: `cache + batch augment (CPU)` is the DataModule's `augment_on: device` run on a CPU: one "
        "fancy-indexed memmap read per batch in the workers, BatchAugment in the main process (as "
        f"on_after_batch_transfer) with {MAIN_THREADS} intra-op thread{'s' if MAIN_THREADS > 1 else ''}, the cores "
        "the workers leave (more OpenMP threads than free cores stall at every op's barrier); `in workers` runs "
        "the same BatchAugment in the loader workers instead (a collate_fn; not a DataModule option)",
        f"CPU load average (1, 5, 15 min) before: {load_before}; after: {_load_average()}, on {os.cpu_count()} "
        "CPUs: other processes sharing them slow every path",
        "Memory: peak anonymous PSS (Pss_Anon: heap, arrays, tensors) summed over the main process and the loader "
        "workers, sampled every 0.2 s from /proc/PID/smaps_rollup; the note adds the total PSS, which includes "
        "mapped file pages (the memmap's page cache, reclaimable); the idle main process holds torch, the model "
        "code and the manifest; the paths run in table order in one process and its allocator keeps what it grew "
        "(e.g. after the batch-augment path), so compare the +deltas, not the totals",
        "Build times: manifest = a fresh scan (no parquet reuse) right after generating/scanning, so the directory "
        "cache is warm; cache = a fresh build (the old one deleted first) with one process per CPU",
        f"Whole slide: `predict` on synthetic scans of {' and '.join(f'{side:,}' for side in sides)} px at level 0 "
        "(0.25 um/px, three levels, Aperio-style SVS written by slides.scan_writer) with a ResNet-18 "
        "IDCClassifier (not pretrained), end to end: thumbnail and tissue mask, tiles streamed window by window "
        "through Lightning's predict loop, GeoJSON and overlay; the model share is the time inside predict_step "
        "(the forward) in the same run",
        "GPU: see docs/benchmarks_gpu.md (benchmarks/gpu.sh on a CUDA machine)",
    ]
    return rows, notes
