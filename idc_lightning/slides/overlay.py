"""The per-slide picture and grid: tissue thumbnail under the probability colour map with the IDC contour, and
the probability grid as .npy with a sidecar JSON that places it on the slide's level-0 pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from idc_lightning.evaluation.heatmaps import OVERLAY_ALPHA, PROB_CMAP, faded_tissue, shrunk
from idc_lightning.evaluation.operating_point import is_idc
from idc_lightning.evaluation.slide_grid import GridGeometry, value_grid
from idc_lightning.slides.scale import WorkingScale
from idc_lightning.slides.tiles import TileGrid

# The axes are ~700 px wide: a larger background only costs memory (matplotlib resamples it in float64 RGBA).
BACKGROUND_MAX_PX = 800


def probability_grid(grid: TileGrid, probs: np.ndarray, scale: WorkingScale) -> tuple[np.ndarray, GridGeometry]:
    """float32 [rows, cols] over the whole slide, one cell per grid step; NaN where no tissue tile was read."""
    geometry = GridGeometry(origin_x=0, origin_y=0, step=grid.stride, rows=(scale.height - 1) // grid.stride + 1,
                            cols=(scale.width - 1) // grid.stride + 1)
    return value_grid(grid.x, grid.y, probs, geometry), geometry


def write_grid(prob_grid: np.ndarray, grid: TileGrid, scale: WorkingScale, threshold: float, stem: Path) -> Path:
    """`<stem>_prob.npy` and `<stem>_prob.json`: cell (r, c) is the tile whose top-left is origin + (c, r) * cell."""
    np.save(stem.with_name(f"{stem.name}_prob.npy"), prob_grid)
    sidecar = {"origin_level0": [0.0, 0.0], "cell_level0": grid.stride * scale.level0_per_px,
               "tile_level0": grid.tile * scale.level0_per_px, "mpp_level0": scale.slide_mpp,
               "working_mpp": scale.mpp, "level_read": scale.level, "threshold": threshold, "rule": "prob >= threshold"}
    path = stem.with_name(f"{stem.name}_prob.json")
    path.write_text(json.dumps(sidecar, indent=2))
    return path


def render_overlay(thumbnail: np.ndarray, prob_grid: np.ndarray, geometry: GridGeometry, scale: WorkingScale,
                   tile: int, threshold: float, title: str, path: Path) -> Path:
    """Tissue (faded) with the probability on a fixed 0-1 scale and the IDC region outlined, in level-0 pixels."""
    width, height = scale.width * scale.level0_per_px, scale.height * scale.level0_per_px
    shift = max(tile - geometry.step, 0) / 2 * scale.level0_per_px
    cell = geometry.step * scale.level0_per_px
    fig = Figure(figsize=(8 * min(max(width / height, 0.5), 2.0) + 1.5, 8))
    fig.set_layout_engine("constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    background = faded_tissue(shrunk(thumbnail, BACKGROUND_MAX_PX, BACKGROUND_MAX_PX))
    ax.imshow(background, extent=(0, width, height, 0), interpolation="bilinear")
    overlay = ax.imshow(np.ma.masked_invalid(prob_grid), cmap=colormaps[PROB_CMAP], vmin=0, vmax=1,
                        alpha=OVERLAY_ALPHA, interpolation="nearest",
                        extent=(shift, shift + geometry.cols * cell, shift + geometry.rows * cell, shift))
    idc = np.pad(is_idc(prob_grid, threshold).astype(float), 1)
    if idc.any():
        centres = shift + (np.arange(-1, geometry.cols + 1) + 0.5) * cell, shift + (np.arange(-1, geometry.rows + 1)
                                                                                  + 0.5) * cell
        ax.contour(*centres, idc, levels=[0.5], colors=["#00e5ff"], linewidths=1.5)
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xlabel("x (level-0 px)")
    ax.set_ylabel("y (level-0 px)")
    ax.set_title(title)
    fig.colorbar(overlay, ax=ax, label="IDC probability (cyan: IDC at the operating point)", shrink=0.8)
    fig.savefig(path, dpi=100, facecolor="white")
    return path
