"""Synthetic H&E slides cut into the exact Kaggle IDC layout: the offline default for the demo, tests and benchmarks.

The real set is a large download behind a login, so the pipeline needs a stand-in that has what it relies on: the
folder and file-name layout, holes where glass was not cut, smaller edge patches at a slide's right/bottom border,
about 28% IDC with some patients free of it, per-patient stain variation and coarse labels at tumour borders.
This module lays slides out as patients and files; `slide_painter` paints each slide.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from idc_lightning.data.manifest import DUPLICATE_TREE as TREE
from idc_lightning.data.progress import progress_bar
from idc_lightning.data.slide_painter import PATCH, cell_share, render_slide

log = logging.getLogger(__name__)

ORIGIN = 1  # the Kaggle offsets start at 1, not 0
# Real Kaggle ids run from 8863 to 16896: synthetic ids start above them, so the two can never be mixed up.
FIRST_PATIENT_ID = 20000
MASKS = "masks"
MARKER = ".synthetic.json"
# Bump when the rendering changes, so `ensure` regenerates datasets written by an older generator.
GENERATOR_VERSION = 2


@dataclass
class SyntheticSummary:
    """What a `write` produced, for logs and for the completion marker."""

    patients: int
    patches: int
    positive_patches: int
    positive_fraction: float
    edge_patches: int
    patients_without_idc: int
    seconds: float

    def describe(self) -> str:
        return (
            f"{self.patches} patches of {self.patients} synthetic patients "
            f"({self.positive_patches} IDC: {self.positive_fraction:.1%}; "
            f"{self.patients_without_idc} patients without IDC; {self.edge_patches} edge patches) "
            f"in {self.seconds:.1f} s"
        )


@dataclass
class SyntheticSlides:
    """Knobs of the generator; every field but `workers` changes the output, and `ensure` compares them.

    Patient i's slide depends only on (seed, i) and the knobs, never on `num_patients` or `workers`, so a
    small set is a prefix of a large one and any worker count writes the same bytes.
    """

    num_patients: int = 20
    seed: int = 0
    grid_min: int = 10  # slide height/width range in 50-px cells, drawn per patient
    grid_max: int = 24
    idc_fraction: float = 0.28  # target share of IDC patches over all patients
    healthy_fraction: float = 0.15  # share of patients without any IDC
    tissue_fraction: float = 0.5  # mean share of a slide covered by tissue (the rest is glass, not cut)
    min_tissue: float = 0.5  # a cell becomes a patch when at least this share of it is tissue
    border_noise: float = 0.35  # how far the rendered tumour strays from its annotated outline
    workers: int | None = None  # processes over patients; None: os.cpu_count()

    def __post_init__(self) -> None:
        if not 2 <= self.grid_min <= self.grid_max:
            raise ValueError(
                f"grid_min={self.grid_min}, grid_max={self.grid_max}: need 2 <= grid_min <= grid_max (cells)"
            )
        if self.num_patients < 1:
            raise ValueError(f"num_patients={self.num_patients}: need at least one patient")
        bounds = {"idc_fraction": (0.01, 0.9), "healthy_fraction": (0.0, 0.95), "tissue_fraction": (0.05, 0.95),
                  "min_tissue": (0.01, 1.0), "border_noise": (0.0, 2.0)}
        for name, (low, high) in bounds.items():
            if not low <= getattr(self, name) <= high:
                raise ValueError(f"{name}={getattr(self, name)}: need a value in [{low}, {high}]")

    def params(self) -> dict[str, object]:
        """The fields that determine the written files (not `workers`), plus the generator version."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "workers"}
        return {**values, "generator_version": GENERATOR_VERSION}

    def patient_ids(self) -> list[str]:
        return [str(FIRST_PATIENT_ID + index) for index in range(self.num_patients)]

    def write(self, out_dir: Path) -> SyntheticSummary:
        """(Re)write the whole dataset under out_dir; the marker goes last so a killed run never looks complete."""
        started = time.perf_counter()
        out_dir = Path(out_dir)
        (out_dir / MARKER).unlink(missing_ok=True)
        for stale in (out_dir / TREE, out_dir / MASKS):
            if stale.exists():
                shutil.rmtree(stale)
        (out_dir / MASKS).mkdir(parents=True)
        jobs = [_PatientJob(self, index, pid, self._is_healthy(index), out_dir)
                for index, pid in enumerate(self.patient_ids())]
        workers = min(self.workers or os.cpu_count() or 1, len(jobs))
        log.info("Writing %d synthetic patients to %s with %d workers", len(jobs), out_dir, workers)
        stats = []
        with progress_bar(f"Writing synthetic patients to {out_dir}", total=len(jobs)) as advance:
            for stat in _write_patients(jobs, workers):
                stats.append(stat)
                advance(1)
        patches = sum(s["patches"] for s in stats)
        positive = sum(s["positive"] for s in stats)
        summary = SyntheticSummary(
            patients=len(stats),
            patches=patches,
            positive_patches=positive,
            positive_fraction=round(positive / max(patches, 1), 4),
            edge_patches=sum(s["edge"] for s in stats),
            patients_without_idc=sum(s["positive"] == 0 for s in stats),
            seconds=round(time.perf_counter() - started, 2),
        )
        partial = out_dir / (MARKER + ".tmp")
        partial.write_text(json.dumps({"params": self.params(), "summary": asdict(summary), "patients": stats},
                                      indent=1))
        partial.replace(out_dir / MARKER)
        log.info("%s", summary.describe())
        return summary

    def ensure(self, out_dir: Path) -> Path:
        """Write the dataset unless out_dir already holds a complete one with the same params; return its root."""
        out_dir = Path(out_dir)
        marker = out_dir / MARKER
        if marker.is_file() and (out_dir / TREE).is_dir():
            if json.loads(marker.read_text())["params"] == self.params():
                log.info("Reusing synthetic slides in %s", out_dir)
                return out_dir / TREE
            log.info("Synthetic slides in %s were written with other params: rewriting", out_dir)
        self.write(out_dir)
        return out_dir / TREE

    def _is_healthy(self, index: int) -> bool:
        """Spread the healthy patients evenly with a seed-dependent phase: the count is exact, the choice seeded."""
        phase = np.random.default_rng([self.seed, 0xC0FFEE]).random()
        f = self.healthy_fraction
        return int(np.floor((index + 1) * f + phase)) > int(np.floor(index * f + phase))


def read_truth_mask(out_dir: Path, patient_id: str) -> np.ndarray:
    """The annotated IDC region of a synthetic slide: bool (H, W) in file-name pixel coordinates.

    The patch named x<X>_y<Y> covers mask[Y:Y+50, X:X+50]; row and column 0 lie before the origin and are False.
    """
    path = Path(out_dir) / MASKS / f"{patient_id}.png"
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise FileNotFoundError(f"No truth mask for patient {patient_id} at {path}: is {out_dir} a synthetic set?")
    return mask > 127


def is_synthetic_tree(root: Path) -> bool:
    """Whether root is the patch tree of a complete generated set: then its truth masks lie beside it."""
    root = Path(root)
    return root.name == TREE and (root.parent / MARKER).is_file()


@dataclass(frozen=True)
class TruthMasks:
    """Per-patch ground truth from a synthetic set's annotated masks: what the heatmaps' Dice is measured on.

    A patch is truly IDC when most of its pixels lie inside the annotated region, the rule its label follows too.
    """

    out_dir: Path
    patch_size: int = PATCH

    def __call__(self, patient_id: str, frame: pd.DataFrame) -> np.ndarray | None:
        if not (Path(self.out_dir) / MASKS / f"{patient_id}.png").is_file():
            return None
        mask = read_truth_mask(self.out_dir, patient_id)
        size = self.patch_size
        cells = zip(frame["x"], frame["y"], strict=True)
        return np.array([mask[y : y + size, x : x + size].mean() > 0.5 for x, y in cells], dtype=bool)


@dataclass(frozen=True)
class _PatientJob:
    slides: SyntheticSlides
    index: int
    patient_id: str
    healthy: bool
    out_dir: Path


def _single_threaded_cv2() -> None:
    """Workers already use every core; OpenCV's own thread pool on top of them only adds contention."""
    cv2.setNumThreads(1)


def _write_patients(jobs: list[_PatientJob], workers: int) -> Iterator[dict[str, object]]:
    """Each patient's stats as it is written, in job order."""
    if workers == 1:
        yield from map(_write_patient, jobs)
        return
    # spawn, not fork: a child forked after OpenCV started its thread pool can deadlock in it.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_single_threaded_cv2) as pool:
        yield from pool.map(_write_patient, jobs)


def _write_patient(job: _PatientJob) -> dict[str, object]:
    """Render one slide, cut it into patch PNGs and save its truth mask; return the patient's counts."""
    knobs = job.slides
    rng = np.random.default_rng([knobs.seed, job.index])
    rows, cols = (int(n) for n in rng.integers(knobs.grid_min, knobs.grid_max + 1, size=2))
    # The slide ends mid-cell at the right and bottom, as scanned slides do: the cells there are cut short.
    height, width = rows * PATCH - int(rng.integers(0, PATCH)), cols * PATCH - int(rng.integers(0, PATCH))
    idc_target = 0.0 if job.healthy else _idc_target(rng, knobs.idc_fraction, knobs.healthy_fraction)
    slide = render_slide(rng, height, width, idc_target, knobs.tissue_fraction, knobs.border_noise)

    tissue_share = cell_share(slide.tissue, rows, cols)
    truth_share = cell_share(slide.truth, rows, cols)
    folder = job.out_dir / TREE / job.patient_id
    for label in (0, 1):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
    patches = positive = edge = 0
    for row, col in zip(*np.nonzero(tissue_share >= knobs.min_tissue), strict=True):
        label = int(truth_share[row, col] > 0.5)
        top, left = row * PATCH - slide.top, col * PATCH - slide.left
        patch = slide.bgr[top:top + PATCH, left:left + PATCH]
        name = f"{job.patient_id}_idx5_x{ORIGIN + PATCH * col}_y{ORIGIN + PATCH * row}_class{label}.png"
        cv2.imwrite(str(folder / str(label) / name), patch)
        patches += 1
        positive += label
        edge += patch.shape[:2] != (PATCH, PATCH)
    mask = np.zeros((height + ORIGIN, width + ORIGIN), np.uint8)
    mask[ORIGIN:, ORIGIN:] = slide.truth.astype(np.uint8) * 255
    cv2.imwrite(str(job.out_dir / MASKS / f"{job.patient_id}.png"), mask)
    return {"patient_id": job.patient_id, "rows": rows, "cols": cols, "patches": patches, "positive": positive,
            "edge": edge}


def _idc_target(rng: np.random.Generator, idc_fraction: float, healthy_fraction: float) -> float:
    """Share of tissue that is IDC on a patient with IDC, varied like the real set (8% to 62% per patient)."""
    mean = min(idc_fraction / (1.0 - healthy_fraction), 0.85)
    concentration = 5.0
    return float(np.clip(rng.beta(mean * concentration, (1 - mean) * concentration), 0.03, 0.9))


def main(argv: list[str] | None = None) -> SyntheticSummary:
    parser = argparse.ArgumentParser(description="Write synthetic IDC slides in the Kaggle layout.")
    parser.add_argument("out", type=Path, help="output folder (the patches go to OUT/" + TREE + ")")
    parser.add_argument("--patients", type=int, default=SyntheticSlides.num_patients)
    parser.add_argument("--seed", type=int, default=SyntheticSlides.seed)
    parser.add_argument("--grid-min", type=int, default=SyntheticSlides.grid_min)
    parser.add_argument("--grid-max", type=int, default=SyntheticSlides.grid_max)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    slides = SyntheticSlides(num_patients=args.patients, seed=args.seed, grid_min=args.grid_min,
                             grid_max=args.grid_max, workers=args.workers)
    summary = slides.write(args.out)
    print(summary.describe())
    return summary


if __name__ == "__main__":
    main()
