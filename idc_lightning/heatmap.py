"""Place per-patch IDC predictions back on their slide and render per-patient heatmaps.

Pure functions over numpy arrays and DataFrames, shared by `callbacks.heatmap` and the `predict` entry point.
A patch's (x, y) is the pixel offset of its top-left corner in the downsampled slide; one patient's patches
tile that slide, with holes where there was only glass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from sklearn.metrics import roc_auc_score

# Kaggle's step: only a lone patch needs this guess, every other step is derived from the data.
DEFAULT_STEP = 50
PROB_CMAP = "inferno"
OVERLAY_ALPHA = 0.6
PATCH_COLUMNS = ("patient_id", "x", "y", "prob")
PANEL_TITLES = {
    "slide": "slide rebuilt from its patches",
    "prob": "predicted IDC probability",
    "label": "ground truth (IDC = 1)",
}


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

    The step is the gcd of all offset differences (25 for stride-25 predictions). The origin is the offsets'
    residue modulo the step, not their minimum, so cells stay slide-absolute: with origin 1 and step 50,
    x=501 is column 10 whichever other patches the patient has. With an explicit step coarser than the data,
    the origin is the smallest residue and patches sharing a cell are averaged by `value_grid`.
    """
    x = np.asarray(x, dtype=np.int64)
    y = np.asarray(y, dtype=np.int64)
    if x.size == 0 or x.shape != y.shape:
        raise ValueError(f"need matching, non-empty x and y offsets; got shapes {x.shape} and {y.shape}")
    if step is None:
        step = int(np.gcd.reduce(np.concatenate([x - x.min(), y - y.min()]))) or DEFAULT_STEP
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
    patches: np.ndarray, x: np.ndarray, y: np.ndarray, geometry: GridGeometry, patch_size: int = 50
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


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice overlap of two IDC masks; NaN entries (glass, unlabelled) in either are ignored.

    Both masks empty gives 1.0: a benign patient on which the model finds no IDC is a perfect call, and
    scoring it 0 or dropping it would bias the mean Dice against the many IDC-free slides.
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"dice needs masks of one shape, got {pred.shape} and {truth.shape}")
    valid = ~(_nan_mask(pred) | _nan_mask(truth))
    p, t = pred[valid].astype(bool), truth[valid].astype(bool)
    denominator = int(p.sum() + t.sum())
    return 1.0 if denominator == 0 else 2.0 * int((p & t).sum()) / denominator


def _nan_mask(mask: np.ndarray) -> np.ndarray:
    return np.isnan(mask) if np.issubdtype(mask.dtype, np.floating) else np.zeros(mask.shape, dtype=bool)


def patient_metrics(prob: np.ndarray, label: np.ndarray | None, threshold: float = 0.5) -> dict[str, float]:
    """Patch count, predicted/true IDC %, AUROC (NaN unless both classes occur) and F1 (NaN when 0/0)."""
    prob = np.asarray(prob, dtype=np.float64)
    predicted = prob >= threshold
    metrics = {"patches": float(len(prob)), "idc_pct": 100.0 * float(predicted.mean())}
    metrics.update(true_idc_pct=math.nan, auroc=math.nan, f1=math.nan)
    if label is None:
        return metrics
    label = np.asarray(label, dtype=np.float64)
    known = np.isfinite(label)
    if not known.any():
        return metrics
    truth, hit, score = label[known].astype(bool), predicted[known], prob[known]
    metrics["true_idc_pct"] = 100.0 * float(truth.mean())
    if 0 < truth.sum() < truth.size:
        metrics["auroc"] = float(roc_auc_score(truth, score))
    tp, fp, fn = int((hit & truth).sum()), int((hit & ~truth).sum()), int((~hit & truth).sum())
    if 2 * tp + fp + fn:
        metrics["f1"] = 2 * tp / (2 * tp + fp + fn)
    return metrics


def render_patient_heatmap(
    patient_id: str,
    thumbnail: np.ndarray | None,
    prob_grid: np.ndarray,
    label_grid: np.ndarray | None,
    metrics: dict[str, float],
    path: Path,
    *,
    geometry: GridGeometry | None = None,
    patch_size: int = 50,
) -> Path:
    """Write a PNG: (a) slide rebuilt from patches, (b) IDC probability over it, (c) ground truth when known.

    Probability and truth share one fixed 0-1 colour scale so they compare by eye; glass (NaN) is transparent.
    `geometry` places grid cells exactly in slide pixels (needed when the step differs from the patch size);
    without it the grid is stretched over the thumbnail. A bare Figure keeps pyplot's global state untouched.
    """
    extent = _grid_extent(prob_grid.shape, thumbnail, geometry, patch_size)
    background = _faded(thumbnail) if thumbnail is not None else None
    panels = ["slide"] * (thumbnail is not None) + ["prob"] + ["label"] * (label_grid is not None)
    left, right, bottom, top = _view_box(extent, thumbnail)
    aspect = min(max((right - left) / (bottom - top), 0.5), 2.5)
    # ~4.3 in of axes height once titles and ticks are placed; width follows the slide's aspect.
    fig = Figure(figsize=(len(panels) * 4.3 * aspect + 1.6, 5.6))
    fig.set_layout_engine("constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), sharex=True, sharey=True, squeeze=False)[0]
    layers = {"prob": prob_grid, "label": label_grid}
    for letter, ax, panel in zip("abc", axes, panels, strict=False):
        ax.set_title(f"({letter}) {PANEL_TITLES[panel]}")
        if panel == "slide":
            ax.imshow(thumbnail, extent=_pixel_extent(thumbnail), interpolation="nearest")
        else:
            overlay = _draw_overlay(ax, layers[panel], background, extent)
    axes[0].set_xlim(left, right)
    axes[0].set_ylim(bottom, top)
    for ax in axes:
        ax.set_xlabel("x (slide px)")
    axes[0].set_ylabel("y (slide px)")
    # Probability and truth share cmap and 0-1 norm, so the last overlay's colourbar serves both.
    fig.colorbar(overlay, ax=axes[-1], label="IDC probability", shrink=0.85, pad=0.02)
    fig.suptitle(_title(patient_id, metrics))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, facecolor="white", bbox_inches="tight")
    return path


def _draw_overlay(
    ax: Axes, grid: np.ndarray, background: np.ndarray | None, extent: tuple[float, float, float, float]
) -> AxesImage:
    """Grid on a fixed 0-1 scale over the faded slide; NaN cells (glass) masked, hence fully transparent."""
    if background is not None:
        ax.imshow(background, extent=_pixel_extent(background), interpolation="nearest")
    return ax.imshow(
        np.ma.masked_invalid(grid),
        cmap=colormaps[PROB_CMAP].with_extremes(bad=(0.0, 0.0, 0.0, 0.0)),
        vmin=0.0,
        vmax=1.0,
        alpha=OVERLAY_ALPHA if background is not None else 1.0,
        extent=extent,
        interpolation="nearest",
    )


def _faded(thumbnail: np.ndarray) -> np.ndarray:
    """Greyscale, lightened tissue: keeps the morphology visible without competing with the colour scale."""
    grey = thumbnail.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    light = 255.0 - 0.6 * (255.0 - grey)
    return np.repeat(light[..., None], 3, axis=-1).astype(np.uint8)


def _pixel_extent(image: np.ndarray) -> tuple[float, float, float, float]:
    return (0.0, float(image.shape[1]), float(image.shape[0]), 0.0)


def _grid_extent(
    shape: tuple[int, ...], thumbnail: np.ndarray | None, geometry: GridGeometry | None, patch_size: int
) -> tuple[float, float, float, float]:
    """(left, right, bottom, top) in slide pixels; y grows downwards, as on the slide."""
    rows, cols = shape
    if geometry is not None:
        # A cell is anchored at its patch's top-left; centre it on the patch when patches overlap.
        shift = max(patch_size - geometry.step, 0) / 2
        return (shift, shift + cols * geometry.step, shift + rows * geometry.step, shift)
    if thumbnail is not None:
        return _pixel_extent(thumbnail)
    return (0.0, float(cols), float(rows), 0.0)


def _view_box(
    extent: tuple[float, float, float, float], thumbnail: np.ndarray | None
) -> tuple[float, float, float, float]:
    """Union of grid and thumbnail, so neither is cropped when a centred grid pokes past the canvas."""
    if thumbnail is None:
        return extent
    return (0.0, max(extent[1], thumbnail.shape[1]), max(extent[2], thumbnail.shape[0]), 0.0)


def _title(patient_id: str, metrics: dict[str, float]) -> str:
    def shown(key: str, spec: str) -> str:
        value = metrics.get(key, math.nan)
        return "n/a" if value is None or math.isnan(value) else format(value, spec)

    idc = f"IDC {shown('idc_pct', '.1f')}% predicted"
    if not math.isnan(metrics.get("true_idc_pct", math.nan)):
        idc += f" ({shown('true_idc_pct', '.1f')}% true)"
    parts = [f"patient {patient_id}", f"{shown('patches', '.0f')} patches", idc]
    parts += [f"AUROC {shown('auroc', '.3f')}", f"F1 {shown('f1', '.3f')}"]
    if not math.isnan(metrics.get("dice", math.nan)):
        parts.append(f"Dice {shown('dice', '.3f')}")
    return " · ".join(parts)


def write_patient_heatmaps(
    predictions: pd.DataFrame,
    patches: Callable[[np.ndarray], np.ndarray] | None,
    out_dir: Path,
    limit: int | None,
    threshold: float = 0.5,
    truth: Callable[[str, pd.DataFrame], np.ndarray | None] | None = None,
) -> pd.DataFrame:
    """Write `<pid>.png` and `<pid>.npy` (raw probability grid) per patient, sorted by id, up to `limit`.

    `patches(cache_index)` supplies pixels for the slide thumbnail; `truth(pid, frame)` supplies per-row
    true IDC (or None) for a patch-level Dice at `threshold`. Returns one row per patient; origin_x,
    origin_y and step map the .npy cells back to slide pixels.
    """
    missing = [c for c in PATCH_COLUMNS if c not in predictions.columns]
    if missing:
        raise ValueError(f"predictions lack column(s) {missing}; expected at least {list(PATCH_COLUMNS)}")
    if patches is not None and "cache_index" not in predictions.columns:
        raise ValueError("patches() was given but predictions have no cache_index column to fetch pixels by")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    patient_ids = predictions["patient_id"].astype(str)
    rows = []
    for patient_id in sorted(patient_ids.unique())[:limit]:
        frame = predictions[patient_ids == patient_id]
        rows.append(_write_one(patient_id, frame, patches, out_dir, threshold, truth))
    columns = ["patient_id", "patches", "idc_pct", "true_idc_pct", "auroc", "f1", "dice"]
    return pd.DataFrame(rows, columns=[*columns, "origin_x", "origin_y", "step", "png"])


def _write_one(
    patient_id: str,
    frame: pd.DataFrame,
    patches: Callable[[np.ndarray], np.ndarray] | None,
    out_dir: Path,
    threshold: float,
    truth: Callable[[str, pd.DataFrame], np.ndarray | None] | None,
) -> dict[str, object]:
    x, y, prob = frame["x"].to_numpy(), frame["y"].to_numpy(), frame["prob"].to_numpy(dtype=np.float64)
    geometry = grid_geometry(x, y)
    label = frame["label"].to_numpy(dtype=np.float64) if "label" in frame.columns else None
    has_labels = label is not None and bool(np.isfinite(label).any())
    metrics = patient_metrics(prob, label, threshold)
    true_idc = truth(patient_id, frame) if truth is not None else None
    metrics["dice"] = dice(prob >= threshold, np.asarray(true_idc)) if true_idc is not None else math.nan
    prob_grid = value_grid(x, y, prob, geometry)
    # Without pixels the patch size is unknown; assuming it equals the step leaves the grid uncentred.
    thumbnail, patch_size = None, geometry.step
    if patches is not None:
        pixels = patches(frame["cache_index"].to_numpy())
        patch_size = pixels.shape[2]
        thumbnail = slide_thumbnail(pixels, x, y, geometry, patch_size)
    png = render_patient_heatmap(
        patient_id,
        thumbnail,
        prob_grid,
        value_grid(x, y, label, geometry) if has_labels else None,
        metrics,
        out_dir / f"{patient_id}.png",
        geometry=geometry,
        patch_size=patch_size,
    )
    np.save(out_dir / f"{patient_id}.npy", prob_grid)
    return {
        "patient_id": patient_id,
        **metrics,
        "patches": len(frame),
        "origin_x": geometry.origin_x,
        "origin_y": geometry.origin_y,
        "step": geometry.step,
        "png": str(png),
    }
