"""Benchmarks of the data pipeline and the training loop: `python -m idc_lightning.bench` writes docs/benchmarks.md.

CPU mode (default) measures, on the full-scale synthetic set (and the real sample when present): manifest and
cache build times, model-ready patches/s of four loader paths, Lightning's overhead over a bare PyTorch loop, and
the peak memory of each loader path. `--gpu` measures train/inference img/s on CUDA instead (benchmarks/gpu.sh).
The measurements live in the other modules of `idc_lightning.bench`, one per kind.

Memory is sampled every 0.2 s during each measurement from Linux's /proc/PID/smaps_rollup, summed over this process
and its DataLoader workers: Pss_Anon (heap, decoded arrays, tensors; what the path really costs) and the total PSS,
which adds mapped files (the memmap's page-cache pages, split between the processes that map them; reclaimable).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch
from rich.console import Console

from idc_lightning.bench.builds import measure_builds
from idc_lightning.bench.gpu import measure_gpu
from idc_lightning.bench.loaders import (
    LOADER_BATCH,
    LOADER_WORKERS,
    MAIN_THREADS,
    SUBSET,
    WARMUP_BATCHES,
    measure_loaders,
)
from idc_lightning.bench.report import Row, markdown, table
from idc_lightning.bench.training import measure_training
from idc_lightning.data.cache import build_cache
from idc_lightning.data.manifest import build_manifest
from idc_lightning.data.synthetic import SyntheticSlides

log = logging.getLogger(__name__)

REAL_SAMPLE = Path(__file__).resolve().parents[3] / "shared" / "data" / "idc_real"


def synthetic_root(args: argparse.Namespace) -> Path:
    slides = SyntheticSlides(num_patients=args.patients, seed=0, grid_min=args.grid_min, grid_max=args.grid_max)
    return slides.ensure(args.data_dir)


def _load_average() -> str:
    return ", ".join(f"{load:.1f}" for load in os.getloadavg())


def run_cpu(args: argparse.Namespace) -> tuple[list[Row], list[str]]:
    load_before = _load_average()
    root = synthetic_root(args)
    rows, cache = measure_builds("synthetic", root, args.data_dir / "cache")
    real = args.real if args.real is not None and args.real.is_dir() else None
    real_cache = None
    if real is not None:
        real_rows, real_cache = measure_builds("real sample", real, args.data_dir / "cache_real")
        rows += real_rows
    rows += measure_loaders("synthetic", root, cache, args.seconds)
    if real_cache is not None:
        rows += measure_loaders("real sample", real, real_cache, args.seconds)
    rows += measure_training(cache, args.train_steps)
    notes = [
        f"Synthetic set: {args.patients} patients, grid {args.grid_min}..{args.grid_max} cells, in {args.data_dir}",
        f"Real sample: {real if real is not None else 'absent (skipped)'}",
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
        "GPU: unmeasured (no GPU in this session); run benchmarks/gpu.sh on a CUDA machine",
    ]
    return rows, notes


def run_gpu(args: argparse.Namespace) -> tuple[list[Row], list[str]]:
    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device: torch.cuda.is_available() is False on this machine "
                         f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}).")
    root = synthetic_root(args)
    manifest, _ = build_manifest(root, args.data_dir / "cache")
    cache = build_cache(manifest, root, args.data_dir / "cache")
    rows = measure_gpu(cache, args.seconds)
    notes = [f"GPU: {torch.cuda.get_device_name()}", f"Synthetic set: {len(cache.rows)} patches; batch 256",
             f"{args.seconds:g} s per measurement after 5 warm-up steps (torch.compile happens in warm-up)"]
    return rows, notes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m idc_lightning.bench", description="Benchmark the IDC data pipeline and training loop.")
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown report (default docs/benchmarks.md, or docs/benchmarks_gpu.md with --gpu)")
    parser.add_argument("--data-dir", type=Path, default=Path("data/bench"), help="generated set (reused if present)")
    parser.add_argument("--patients", type=int, default=162)
    parser.add_argument("--grid-min", type=int, default=44)
    parser.add_argument("--grid-max", type=int, default=74)
    parser.add_argument("--seconds", type=float, default=20.0, help="time budget of each throughput measurement")
    parser.add_argument("--train-steps", type=int, default=20, help="measured training steps per loop")
    parser.add_argument("--real", type=Path, default=REAL_SAMPLE, help="real Kaggle sample (skipped if absent)")
    parser.add_argument("--quick", action="store_true", help="tiny set and short measurements (tests)")
    parser.add_argument("--gpu", action="store_true", help="CUDA train/inference img/s instead of the CPU benchmarks")
    args = parser.parse_args(argv)
    if args.quick:
        args.patients, args.grid_min, args.grid_max = 3, 8, 10
        args.seconds, args.train_steps = min(args.seconds, 1.0), min(args.train_steps, 2)
    if args.out is None:
        args.out = Path("docs/benchmarks_gpu.md" if args.gpu else "docs/benchmarks.md")
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    rows, notes = run_gpu(args) if args.gpu else run_cpu(args)
    command = "python -m idc_lightning.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    Console(width=None if sys.stdout.isatty() else 160).print(table(rows, "idc_lightning benchmarks"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows, command.strip(), notes))
    log.info("Wrote %s", args.out)
    return rows

