"""Per-patient IDC heatmap figures: the slide rebuilt from its patches, the probability over it, the truth.

Shared by the heatmap callback (after testing) and `predict`; calls and scores at one operating point.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import AxesImage

from idc_lightning.evaluation.metrics import confusion_counts, f1_score, patient_scores
from idc_lightning.evaluation.operating_point import is_idc
from idc_lightning.evaluation.slide_grid import GridGeometry, grid_geometry, slide_thumbnail, value_grid
from idc_lightning.preprocessing import LUMA, PATCH_SIZE

PROB_CMAP = "inferno"
OVERLAY_ALPHA = 0.6
FIGURE_DPI = 100
PANEL_HEIGHT_IN = 4.3  # axes height once titles and ticks are placed; the width follows the slide's aspect
# A slide image is area-averaged down to twice its panel's pixels before drawing: a 74 x 74-cell slide's 3,700 px
# in a 430 px panel only slow savefig down and alias under nearest sampling.
DRAW_OVERSAMPLE = 2
PATCH_COLUMNS = ("patient_id", "x", "y", "prob")
PANEL_TITLES = {
    "slide": "slide rebuilt from its patches",
    "prob": "predicted IDC probability",
    "label": "ground truth (IDC = 1)",
}


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice overlap of a predicted and a true IDC mask (the F1 formula); NaN entries in either are ignored.

    Like F1, defined only when the truth holds IDC: an IDC-free patient is judged by its specificity instead.
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"dice needs masks of one shape, got {pred.shape} and {truth.shape}")
    valid = ~(_nan_mask(pred) | _nan_mask(truth))
    counts = confusion_counts(pred[valid].astype(bool), truth[valid].astype(bool))
    return f1_score(counts["tp"], counts["fp"], counts["fn"])


def _nan_mask(mask: np.ndarray) -> np.ndarray:
    return np.isnan(mask) if np.issubdtype(mask.dtype, np.floating) else np.zeros(mask.shape, dtype=bool)


def render_patient_heatmap(
    patient_id: str,
    thumbnail: np.ndarray | None,
    prob_grid: np.ndarray,
    label_grid: np.ndarray | None,
    metrics: dict[str, float],
    path: Path,
    *,
    geometry: GridGeometry | None = None,
    patch_size: int = PATCH_SIZE,
) -> Path:
    """Write a PNG: (a) slide rebuilt from patches, (b) IDC probability over it, (c) ground truth when known.

    Probability and truth share one fixed 0-1 colour scale so they compare by eye; glass (NaN) is transparent.
    `geometry` places grid cells exactly in slide pixels (needed when the step differs from the patch size);
    without it the grid is stretched over the thumbnail. A bare Figure keeps pyplot's global state untouched.
    """
    extent = _grid_extent(prob_grid.shape, thumbnail, geometry, patch_size)
    panels = ["slide"] * (thumbnail is not None) + ["prob"] + ["label"] * (label_grid is not None)
    left, right, bottom, top = _view_box(extent, thumbnail)
    aspect = min(max((right - left) / (bottom - top), 0.5), 2.5)
    panel_px = (PANEL_HEIGHT_IN * FIGURE_DPI, PANEL_HEIGHT_IN * aspect * FIGURE_DPI)
    drawn = shrunk(thumbnail, *(DRAW_OVERSAMPLE * side for side in panel_px)) if thumbnail is not None else None
    background = faded_tissue(drawn) if drawn is not None else None
    slide_extent = _pixel_extent(thumbnail) if thumbnail is not None else None
    fig = Figure(figsize=(len(panels) * PANEL_HEIGHT_IN * aspect + 1.6, 5.6))
    fig.set_layout_engine("constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), sharex=True, sharey=True, squeeze=False)[0]
    layers = {"prob": prob_grid, "label": label_grid}
    for letter, ax, panel in zip("abc", axes, panels, strict=False):
        ax.set_title(f"({letter}) {PANEL_TITLES[panel]}")
        if panel == "slide":
            ax.imshow(drawn, extent=slide_extent, interpolation="nearest")
        else:
            overlay = _draw_overlay(ax, layers[panel], background, slide_extent, extent)
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
    fig.savefig(path, dpi=FIGURE_DPI, facecolor="white", bbox_inches="tight")
    return path


def _draw_overlay(
    ax: Axes,
    grid: np.ndarray,
    background: np.ndarray | None,
    slide_extent: tuple[float, float, float, float] | None,
    extent: tuple[float, float, float, float],
) -> AxesImage:
    """Grid on a fixed 0-1 scale over the faded slide; NaN cells (glass) masked, hence fully transparent."""
    if background is not None:
        ax.imshow(background, extent=slide_extent, interpolation="nearest")
    return ax.imshow(
        np.ma.masked_invalid(grid),
        cmap=colormaps[PROB_CMAP].with_extremes(bad=(0.0, 0.0, 0.0, 0.0)),
        vmin=0.0,
        vmax=1.0,
        alpha=OVERLAY_ALPHA if background is not None else 1.0,
        extent=extent,
        interpolation="nearest",
    )


def shrunk(image: np.ndarray, max_height: float, max_width: float) -> np.ndarray:
    """The image area-averaged to fit max_height x max_width px, aspect kept; drawn over its full-size extent."""
    scale = min(max_height / image.shape[0], max_width / image.shape[1])
    if scale >= 1:
        return image
    size = (max(round(image.shape[1] * scale), 1), max(round(image.shape[0] * scale), 1))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def faded_tissue(thumbnail: np.ndarray) -> np.ndarray:
    """Greyscale, lightened tissue: keeps the morphology visible without competing with the colour scale."""
    grey = thumbnail.astype(np.float32) @ np.array(LUMA, dtype=np.float32)
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

    idc = f"IDC {shown('predicted_idc_pct', '.1f')}% predicted"
    if not math.isnan(metrics.get("idc_pct", math.nan)):
        idc += f" ({shown('idc_pct', '.1f')}% true)"
    parts = [f"patient {patient_id}", f"{shown('patches', '.0f')} patches", idc]
    parts += [f"AUROC {shown('auroc', '.3f')}", f"F1 {shown('f1', '.3f')}"]
    if not math.isnan(metrics.get("specificity", math.nan)):
        parts.append(f"specificity {shown('specificity', '.3f')}")
    if not math.isnan(metrics.get("dice", math.nan)):
        parts.append(f"Dice {shown('dice', '.3f')}")
    return " · ".join(parts)


def write_patient_heatmaps(
    predictions: pd.DataFrame,
    patches: Callable[[np.ndarray], np.ndarray] | None,
    out_dir: Path,
    limit: int | None,
    threshold: float,
    truth: Callable[[str, pd.DataFrame], np.ndarray | None] | None = None,
) -> pd.DataFrame:
    """Write `<pid>.png` and `<pid>.npy` (raw probability grid) per patient, sorted by id, up to `limit`.

    `threshold` is the operating point of every call (IDC %, F1, specificity, Dice). `patches(cache_index)`
    supplies pixels for the slide thumbnail; `truth(pid, frame)` supplies per-row true IDC (or None) for a
    patch-level Dice. Returns one row per patient; origin_x, origin_y and step map the .npy cells back to slide
    pixels.
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
    columns = ["patient_id", "patches", "idc_pct", "predicted_idc_pct", "auroc", "f1", "specificity", "dice"]
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
    label = (pd.to_numeric(frame["label"]).to_numpy(np.float64, na_value=np.nan)
             if "label" in frame.columns else None)
    has_labels = label is not None and bool(np.isfinite(label).any())
    metrics = patient_scores(prob, label, threshold)
    true_idc = truth(patient_id, frame) if truth is not None else None
    metrics["dice"] = dice(is_idc(prob, threshold), np.asarray(true_idc)) if true_idc is not None else math.nan
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
