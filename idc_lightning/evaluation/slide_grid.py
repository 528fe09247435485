"""Place per-patch values back on their slide: a patch's (x, y) is the pixel offset of its top-left corner.

One patient's patches tile that patient's downsampled slide, with holes where there was only glass. Pure functions
over numpy arrays, shared by the heatmap figures and `predict`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from idc_lightning.preprocessing import PATCH_SIZE

# The share of a slide's patches (at least one) that may lie off the grid its step is derived from: stray files.
OFF_GRID_SHARE = 0.05


@dataclass(frozen=True)
class GridGeometry:
    """Slide-absolute grid: cell (row, col) holds the patch whose top-left is origin + (col, row) * step."""

    origin_x: int
    origin_y: int
    step: int
    rows: int
    cols: int


def grid_geometry(x: np.ndarray, y: np.ndarray, step: int | None = None) -> GridGeometry:
    """Derive the grid from the offsets, so neither the 50-px step nor Kaggle's +1 origin is assumed.

    The step comes from the spacings between neighbouring columns and rows (25 for stride-25 predictions;
    `grid_step` keeps a few stray files from shrinking it). The origin is the offsets' smallest residue modulo the
    step, not their minimum, so cells stay slide-absolute: with origin 1 and step 50, x=501 is column 10 whichever
    other patches the patient has. A patch off the grid, or with an explicit step coarser than the data, shares the
    cell starting at or before it, and patches sharing a cell are averaged by `value_grid`.
    """
    x = np.asarray(x, dtype=np.int64)
    y = np.asarray(y, dtype=np.int64)
    if x.size == 0 or x.shape != y.shape:
        raise ValueError(f"need matching, non-empty x and y offsets; got shapes {x.shape} and {y.shape}")
    if step is None:
        step = grid_step(x, y)
    if step <= 0:
        raise ValueError(f"grid step must be a positive number of pixels, got {step}")
    origin_x, origin_y = int((x % step).min()), int((y % step).min())
    return GridGeometry(
        origin_x=origin_x,
        origin_y=origin_y,
        step=step,
        rows=int((y.max() - origin_y) // step) + 1,
        cols=int((x.max() - origin_x) // step) + 1,
    )


def grid_step(x: np.ndarray, y: np.ndarray) -> int:
    """The step of the grid the patches lie on, from the spacings between neighbouring columns and rows.

    The plain gcd of the spacings turns one stray file (x=1078 among 1, 51, ...) into a 1-px grid: a heatmap of
    specks, 2,500 times larger. So the most common spacing is the first guess, refined by the next most common
    (gcd) while more than `max(1, OFF_GRID_SHARE * n)` patches lie off its lattice: a sparse sample, whose spacings
    are mostly twice the step, gets the step back; a few strays at odd offsets stay off the grid.
    """
    spacings = np.concatenate([np.diff(np.unique(x)), np.diff(np.unique(y))])
    if spacings.size == 0:
        return PATCH_SIZE  # a lone patch has no neighbour to derive the step from: assume the Kaggle grid
    values, counts = np.unique(spacings, return_counts=True)
    allowed_off_grid = max(1, int(OFF_GRID_SHARE * x.size))
    step = 0
    for spacing in values[np.argsort(-counts, kind="stable")]:
        step = int(np.gcd(step, spacing))
        if _off_one_lattice(x, y, step) <= allowed_off_grid:
            break
    return step


def _off_one_lattice(x: np.ndarray, y: np.ndarray, step: int) -> int:
    """How many patches have an x or y off its axis's most common residue modulo step."""
    on_lattice = np.ones(x.size, dtype=bool)
    for offsets in (x % step, y % step):
        residues, counts = np.unique(offsets, return_counts=True)
        on_lattice &= offsets == residues[counts.argmax()]
    return int((~on_lattice).sum())


def cell_index(x: np.ndarray, y: np.ndarray, geometry: GridGeometry) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of each patch; fails loudly if a patch falls outside the geometry it is placed on."""
    cols = (np.asarray(x, dtype=np.int64) - geometry.origin_x) // geometry.step
    rows = (np.asarray(y, dtype=np.int64) - geometry.origin_y) // geometry.step
    outside = (rows < 0) | (rows >= geometry.rows) | (cols < 0) | (cols >= geometry.cols)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise ValueError(
            f"patch at x={int(np.asarray(x)[i])}, y={int(np.asarray(y)[i])} lies outside {geometry}; "
            "build the geometry with grid_geometry() from the same patches"
        )
    return rows, cols


def value_grid(x: np.ndarray, y: np.ndarray, values: np.ndarray, geometry: GridGeometry) -> np.ndarray:
    """float32 [rows, cols] of per-patch values; NaN marks glass (no patch), never 0, which would read benign.

    Several finite values in one cell (overlapping placements, DDP padding duplicates) are averaged.
    """
    rows, cols = cell_index(x, y, geometry)
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    shape = (geometry.rows, geometry.cols)
    total, count = np.zeros(shape), np.zeros(shape)
    np.add.at(total, (rows[finite], cols[finite]), values[finite])
    np.add.at(count, (rows[finite], cols[finite]), 1)
    grid = np.full(shape, np.nan, dtype=np.float32)
    filled = count > 0
    grid[filled] = total[filled] / count[filled]
    return grid


def slide_thumbnail(
    patches: np.ndarray, x: np.ndarray, y: np.ndarray, geometry: GridGeometry, patch_size: int = PATCH_SIZE
) -> np.ndarray:
    """uint8 RGB canvas (white = glass) with each patch pasted at its pixel offset from the grid origin."""
    patches = np.asarray(patches)
    if patches.ndim != 4 or patches.shape[-1] != 3 or len(patches) != len(x):
        raise ValueError(f"expected uint8 patches [N={len(x)}, h, w, 3], got shape {patches.shape}")
    left = np.asarray(x, dtype=np.int64) - geometry.origin_x
    top = np.asarray(y, dtype=np.int64) - geometry.origin_y
    h, w = patches.shape[1:3]
    height = max((geometry.rows - 1) * geometry.step + patch_size, int(top.max()) + h)
    width = max((geometry.cols - 1) * geometry.step + patch_size, int(left.max()) + w)
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    for patch, t, left_px in zip(patches, top, left, strict=True):
        canvas[t : t + h, left_px : left_px + w] = patch
    return canvas
