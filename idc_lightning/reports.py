"""The files a researcher reads after a run: results.json, predictions, per-patient table, curves."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from torchmetrics.functional.classification import binary_precision_recall_curve, binary_roc  # noqa: E402

from idc_lightning.image_logging import log_images  # noqa: E402
from idc_lightning.metrics import has_both_classes, patient_metrics  # noqa: E402


def _json_number(value: float) -> float | None:
    return None if isinstance(value, float) and math.isnan(value) else value


def write_results(path: Path, metrics: dict[str, float]) -> Path:
    """Flat dict under the logged names; NaN (undefined) becomes null so every JSON reader accepts it."""
    path.write_text(json.dumps({k: _json_number(float(v)) for k, v in sorted(metrics.items())}, indent=1))
    return path


def write_curves(output_dir: Path, predictions: pd.DataFrame, threshold: float) -> list[Path]:
    """ROC, precision-recall and confusion-matrix PNGs of the test patches."""
    probs = torch.tensor(predictions["prob"].to_numpy())
    labels = torch.tensor(predictions["label"].to_numpy()).long()
    paths = []
    if has_both_classes(labels):
        fpr, tpr, _ = binary_roc(probs, labels)
        precision, recall, _ = binary_precision_recall_curve(probs, labels)
        for name, (xs, ys, xlabel, ylabel) in {
            "roc": (fpr, tpr, "false positive rate", "true positive rate"),
            "pr": (recall, precision, "recall", "precision"),
        }.items():
            figure, axis = plt.subplots(figsize=(4.5, 4.5))
            axis.plot(xs.numpy(), ys.numpy())
            axis.set(xlabel=xlabel, ylabel=ylabel, xlim=(0, 1), ylim=(0, 1.02), title=f"test {name.upper()}")
            axis.grid(alpha=0.3)
            paths.append(output_dir / f"{name}_curve.png")
            figure.savefig(paths[-1], dpi=120, bbox_inches="tight")
            plt.close(figure)
    predicted = (probs >= threshold).long()
    matrix = np.array([[int(((labels == t) & (predicted == p)).sum()) for p in (0, 1)] for t in (0, 1)])
    figure, axis = plt.subplots(figsize=(4, 3.6))
    axis.imshow(matrix, cmap="Blues")
    for (row, col), count in np.ndenumerate(matrix):
        axis.text(col, row, f"{count:,}", ha="center", va="center",
                  color="white" if count > matrix.max() / 2 else "black")
    axis.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["non-IDC", "IDC"], yticklabels=["non-IDC", "IDC"],
             xlabel="predicted", ylabel="true", title=f"test, threshold {threshold:.2f}")
    paths.append(output_dir / "confusion_matrix.png")
    figure.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(figure)
    return paths


def write_test_report(output_dir: Path, predictions: pd.DataFrame, metrics: dict[str, float],
                      val_threshold: float = 0.5, threshold: float = 0.5) -> tuple[dict[str, float], list[Path]]:
    """predictions.parquet, patients.csv (+ the patient mean in the metrics), results.json and curve PNGs.

    Patient F1/balanced accuracy use the fixed `threshold`, as test/f1 does; the confusion matrix shows the
    operating point chosen on validation. Returns the metrics with the patient means added, and the PNGs written.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    predictions[["patient_id", "x", "y", "label", "prob"]].to_parquet(output_dir / "predictions.parquet", index=False)
    patients = patient_metrics(predictions, threshold=threshold)
    patients.to_csv(output_dir / "patients.csv", index=False)
    metrics = dict(metrics)
    for column in ("auroc", "f1", "bal_acc"):
        metrics[f"test/patient_mean_{column}"] = float(patients[column].mean(skipna=True))
    write_results(output_dir / "results.json", metrics)
    return metrics, write_curves(output_dir, predictions, val_threshold)


def results_table(metrics: dict[str, float], output_dir: Path, threshold: float = 0.5) -> Table:
    """The few numbers a run is judged by, at 0.5 and at the threshold chosen on validation."""
    table = Table(title=f"Test patients · run folder {output_dir}")
    table.add_column("threshold")
    names = ("auroc", "auprc", "f1", "bal_acc", "sensitivity", "specificity")
    for name in names:
        table.add_column(name, justify="right")
    val_label = f"val {metrics.get('test/val_threshold', math.nan):.3f}"
    for label, suffix in ((f"{threshold:g}", ""), (val_label, "@val_thr")):
        # AUROC and AUPRC do not depend on a threshold: the same value on both rows.
        values = [metrics.get(f"test/{name}" if name.startswith("au") else f"test/{name}{suffix}") for name in names]
        table.add_row(label, *("–" if v is None or math.isnan(v) else f"{v:.3f}" for v in values))
    return table


def publish_test_report(trainer: L.Trainer, model: L.LightningModule, metrics: dict[str, float],
                        output_dir: Path) -> dict[str, float]:
    """Rank 0 after testing `model` (an IDCClassifier): the report files, the figures and patient means to every
    logger, a console table."""
    threshold = float(model.hparams.threshold)
    metrics, figures = write_test_report(output_dir, model.test_predictions, metrics, float(model.val_threshold),
                                         threshold)
    log_images(trainer.loggers, "curves", figures, [figure.stem for figure in figures], trainer.global_step)
    patient_means = {k: v for k, v in metrics.items() if k.startswith("test/patient_mean_") and not math.isnan(v)}
    for logger in trainer.loggers:
        logger.log_metrics(patient_means, step=trainer.global_step)
    Console().print(results_table(metrics, output_dir, threshold))
    return metrics
