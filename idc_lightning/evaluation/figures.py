"""ROC, precision-recall and confusion-matrix PNGs of a split, and sending PNGs to the loggers that take images."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from torchmetrics.functional.classification import binary_precision_recall_curve, binary_roc

from idc_lightning.evaluation.calibration import expected_calibration_error, reliability_table
from idc_lightning.evaluation.metrics import confusion_counts
from idc_lightning.evaluation.operating_point import is_idc


def _figure(size: tuple[float, float]) -> tuple[Figure, object]:
    """A bare Figure: pyplot's global state stays untouched (callbacks run inside other people's programs)."""
    figure = Figure(figsize=size)
    FigureCanvasAgg(figure)
    return figure, figure.subplots()


def write_curves(output_dir: Path, predictions: pd.DataFrame, threshold: float) -> list[Path]:
    """roc_curve.png and pr_curve.png (when both classes occur) and confusion_matrix.png at `threshold`."""
    probs = predictions["prob"].to_numpy(np.float32)
    labels = predictions["label"].to_numpy(np.int64)
    paths = []
    if labels.any() and (labels == 0).any():
        scores, targets = torch.tensor(probs), torch.tensor(labels)
        fpr, tpr, _ = binary_roc(scores, targets)
        precision, recall, _ = binary_precision_recall_curve(scores, targets)
        for name, (xs, ys, xlabel, ylabel) in {
            "roc": (fpr, tpr, "false positive rate", "true positive rate"),
            "pr": (recall, precision, "recall", "precision"),
        }.items():
            figure, axis = _figure((4.5, 4.5))
            axis.plot(xs.numpy(), ys.numpy())
            axis.set(xlabel=xlabel, ylabel=ylabel, xlim=(0, 1), ylim=(0, 1.02), title=f"test {name.upper()}")
            axis.grid(alpha=0.3)
            paths.append(output_dir / f"{name}_curve.png")
            figure.savefig(paths[-1], dpi=120, bbox_inches="tight")
    counts = confusion_counts(is_idc(probs, threshold), labels == 1)
    matrix = np.array([[counts["tn"], counts["fp"]], [counts["fn"], counts["tp"]]])
    figure, axis = _figure((4, 3.6))
    axis.imshow(matrix, cmap="Blues")
    for (row, col), count in np.ndenumerate(matrix):
        axis.text(col, row, f"{count:,}", ha="center", va="center",
                  color="white" if count > matrix.max() / 2 else "black")
    axis.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["non-IDC", "IDC"], yticklabels=["non-IDC", "IDC"],
             xlabel="predicted", ylabel="true", title=f"test, IDC when prob >= {threshold:.3f}")
    paths.append(output_dir / "confusion_matrix.png")
    figure.savefig(paths[-1], dpi=120, bbox_inches="tight")
    return paths


def write_reliability_diagram(output_dir: Path, predictions: pd.DataFrame) -> Path:
    """reliability_diagram.png: observed IDC fraction against mean predicted probability per bin; the diagonal is
    perfect calibration. Bar widths show how many patches each bin holds."""
    probs = predictions["prob"].to_numpy(np.float64)
    labels = predictions["label"].to_numpy(np.int64)
    table = reliability_table(probs, labels)
    figure, axis = _figure((4.5, 4.5))
    axis.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    axis.plot(table["mean_prob"], table["idc_fraction"], marker="o", label="test patches")
    share = table["patches"] / table["patches"].sum()
    axis.bar(table["mean_prob"], share, width=0.03, alpha=0.3, color="grey", label="share of patches")
    ece = expected_calibration_error(probs, labels)
    axis.set(xlabel="mean predicted IDC probability", ylabel="observed IDC fraction", xlim=(0, 1), ylim=(0, 1.02),
             title=f"test reliability, ECE {ece:.3f}")
    axis.legend(loc="upper left", fontsize=8)
    axis.grid(alpha=0.3)
    path = output_dir / "reliability_diagram.png"
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return path


def log_images(loggers: Sequence[Logger], key: str, pngs: Sequence[Path | str], captions: Sequence[str],
               step: int) -> None:
    """W&B: one panel `key` with a captioned image per file; TensorBoard: `key/caption` images; others: none."""
    if not pngs:
        return
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[str(png) for png in pngs], caption=list(captions), step=step)
        elif isinstance(logger, TensorBoardLogger):
            for caption, png in zip(captions, pngs, strict=True):
                image = np.asarray(Image.open(png).convert("RGB"))
                logger.experiment.add_image(f"{key}/{caption}", image, step, dataformats="HWC")
