"""How long generating the synthetic set, a fresh manifest scan and a fresh cache build take."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from idc_lightning.bench.report import Row
from idc_lightning.data.cache import PatchCache, build_cache
from idc_lightning.data.manifest import build_manifest
from idc_lightning.data.synthetic import SyntheticSlides


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def measure_synthetic(slides: SyntheticSlides, data_dir: Path) -> tuple[Row, Path]:
    """Generate the synthetic set, or reuse the identical one already in data_dir (then the time is near 0)."""
    root, seconds = timed(lambda: slides.ensure(data_dir))
    processes = slides.workers or os.cpu_count()
    row = Row("build", "synthetic set", seconds, "s",
              f"{slides.num_patients} patients, grid {slides.grid_min}..{slides.grid_max} cells, {processes} "
              "processes; near 0 when an identical set was reused")
    return row, root


def measure_builds(label: str, root: Path, cache_dir: Path,
                   workers: int | None = None) -> tuple[list[Row], PatchCache]:
    """Fresh manifest scan (no parquet reuse), a fresh cache build (an existing one is deleted first) with
    `workers` processes (None: one per CPU), and what a run pays when nothing changed: the check that every file
    kept its size and mtime, then reuse of the saved manifest and cache."""
    (manifest, report), manifest_s = timed(lambda: build_manifest(root))
    shutil.rmtree(cache_dir / "patches", ignore_errors=True)
    cache, cache_s = timed(lambda: build_cache(manifest, root, cache_dir, workers=workers))
    size_mib = cache.images.nbytes / 2**20
    build_manifest(root, cache_dir)  # saves the manifest for reuse

    def reuse() -> None:
        saved, _ = build_manifest(root, cache_dir)
        build_cache(saved, root, cache_dir, workers=workers)

    _, reuse_s = timed(reuse)
    rows = [
        Row("build", f"manifest scan ({label})", manifest_s, "s",
            f"{report.patches} patches, {report.patients} patients"),
        Row("build", f"cache build ({label})", cache_s, "s",
            f"{len(cache.rows)} patches, {size_mib:.0f} MiB memmap, {workers or os.cpu_count()} workers"),
        Row("build", f"unchanged-tree check and reuse ({label})", reuse_s, "s",
            f"{report.files_seen} files: walk, size and mtime of each, saved manifest and cache reused"),
    ]
    return rows, cache
