"""`python -m idc_lightning.bench`: the CPU benchmarks (default; `cpu`) or the GPU ones (`--gpu`, `gpu`), written as
markdown to docs/. Each mode's modules are imported only when it runs: the CPU mode compares with albumentations,
which the lent GPU machine does not have."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from rich.console import Console

from idc_lightning.bench.report import Row, markdown, table

log = logging.getLogger(__name__)

REAL_SAMPLE = Path(__file__).resolve().parents[3] / "shared" / "data" / "idc_real"
DRY_RUN_REPORT = Path("outputs/bench/benchmarks_gpu_dry_run.md")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m idc_lightning.bench", description="Benchmark the IDC data pipeline and training loop.")
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown report, rewritten whole (default docs/benchmarks_cpu.md; "
                             f"docs/benchmarks_gpu.md with --gpu; {DRY_RUN_REPORT} with --dry-run)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="generated set, reused if present (default data/bench; data/bench_dry_run with --dry-run)")
    parser.add_argument("--patients", type=int, default=162)
    parser.add_argument("--grid-min", type=int, default=44)
    parser.add_argument("--grid-max", type=int, default=74)
    parser.add_argument("--workers", type=int, default=None,
                        help="processes generating the set and packing its cache (default: one per CPU)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="time box of each throughput measurement (default 20; 8 with --gpu; 0.3 with --dry-run)")
    parser.add_argument("--train-steps", type=int, default=20, help="measured training steps per loop (CPU mode)")
    parser.add_argument("--real", type=Path, default=REAL_SAMPLE, help="real Kaggle sample (skipped if absent)")
    parser.add_argument("--quick", action="store_true", help="CPU mode on a tiny set with short measurements (tests)")
    parser.add_argument("--gpu", action="store_true", help="CUDA train/inference img/s instead of the CPU benchmarks")
    parser.add_argument("--dry-run", action="store_true",
                        help="the --gpu path on the CPU with a tiny set and tiny sizes: tests the code in seconds")
    parser.add_argument("--budget", type=float, default=480.0,
                        help="--gpu: seconds from start after which no row starts (skipped rows are listed)")
    args = parser.parse_args(argv)
    args.gpu = args.gpu or args.dry_run
    if args.quick or args.dry_run:
        args.patients, args.grid_min, args.grid_max = 3, 8, 10
        args.train_steps = min(args.train_steps, 2)
    if args.seconds is None:
        args.seconds = 0.3 if args.dry_run else 1.0 if args.quick else 8.0 if args.gpu else 20.0
    if args.data_dir is None:  # the dry run's tiny set must not overwrite the full-scale one
        args.data_dir = Path("data/bench_dry_run" if args.dry_run else "data/bench")
    if args.out is None:
        default = Path("docs/benchmarks_gpu.md" if args.gpu else "docs/benchmarks_cpu.md")
        args.out = DRY_RUN_REPORT if args.dry_run else default
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    deadline = time.monotonic()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    deadline += args.budget
    if args.gpu:
        from idc_lightning.bench.gpu import run_gpu

        rows, notes = run_gpu(args, deadline)
        title = "GPU benchmarks (dry run on the CPU)" if args.dry_run else "GPU benchmarks"
    else:
        from idc_lightning.bench.cpu import run_cpu

        rows, notes = run_cpu(args)
        title = "CPU benchmarks"
    command = "python -m idc_lightning.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    Console(width=None if sys.stdout.isatty() else 160).print(table(rows, f"idc_lightning {title.lower()}"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows, command.strip(), notes, title))
    log.info("Wrote %s", args.out)
    return rows
