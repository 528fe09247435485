"""The files a researcher reads after testing: results.json, predictions, patients.csv, curves, a console table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pandas as pd
from rich.console import Console
from rich.table import Table

from idc_lightning.evaluation.figures import log_images, write_curves, write_reliability_diagram
from idc_lightning.evaluation.metrics import patient_means, patient_table
from idc_lightning.interfaces import EvaluatedModel

TABLE_METRICS = ("auroc", "auprc", "f1", "bal_acc", "sensitivity", "specificity")
# prob: in its slide context (model.context_sigma), what the metrics use; patch_prob: the patch alone.
PREDICTION_COLUMNS = ["patient_id", "x", "y", "label", "patch_prob", "prob"]


def _json_number(value: float) -> float | None:
    return None if isinstance(value, float) and math.isnan(value) else value


def write_results(path: Path, metrics: dict[str, float]) -> Path:
    """Flat dict under the logged names; NaN (undefined) becomes null so every JSON reader accepts it."""
    path.write_text(json.dumps({k: _json_number(float(v)) for k, v in sorted(metrics.items())}, indent=1))
    return path


def write_test_report(output_dir: Path, predictions: pd.DataFrame, metrics: dict[str, float],
                      threshold: float) -> tuple[dict[str, float], list[Path]]:
    """predictions.parquet, patients.csv, the curve PNGs at the operating point `threshold`, the reliability diagram;
    results.json with the patient means added. Returns the metrics with the patient means, and the PNGs written."""
    output_dir.mkdir(parents=True, exist_ok=True)
    predictions[PREDICTION_COLUMNS].to_parquet(output_dir / "predictions.parquet", index=False)
    patients = patient_table(predictions, threshold)
    patients.to_csv(output_dir / "patients.csv", index=False)
    metrics = dict(metrics)
    metrics.update({f"test/patient_mean_{name}": value for name, value in patient_means(patients).items()})
    write_results(output_dir / "results.json", metrics)
    figures = [*write_curves(output_dir, predictions, threshold), write_reliability_diagram(output_dir, predictions)]
    return metrics, figures


def results_table(metrics: dict[str, float], output_dir: Path, fixed_threshold: float) -> Table:
    """The few numbers a run is judged by, at the fixed threshold and at the operating point chosen on validation."""
    table = Table(title=f"Test patients · run folder {output_dir}")
    table.add_column("IDC when prob >=")
    for name in TABLE_METRICS:
        table.add_column(name, justify="right")
    val_label = f"{metrics.get('test/val_threshold', math.nan):.3f} (val)"
    for label, suffix in ((f"{fixed_threshold:g} (fixed)", ""), (val_label, "@val_thr")):
        # AUROC and AUPRC do not depend on a threshold: the same value on both rows.
        keys = [f"test/{name}" if name.startswith("au") else f"test/{name}{suffix}" for name in TABLE_METRICS]
        values = [metrics.get(key) for key in keys]
        table.add_row(label, *("–" if v is None or math.isnan(v) else f"{v:.3f}" for v in values))
    return table


def publish_test_report(trainer: L.Trainer, model: EvaluatedModel, metrics: dict[str, float],
                        output_dir: Path) -> dict[str, float]:
    """Rank 0 after testing: the report files, the figures and patient means to every logger, a console table."""
    threshold = model.operating_point.threshold
    metrics, figures = write_test_report(output_dir, model.predictions["test"], metrics, threshold)
    log_images(trainer.loggers, "curves", figures, [figure.stem for figure in figures], trainer.global_step)
    means = {k: v for k, v in metrics.items() if k.startswith("test/patient_mean_") and not math.isnan(v)}
    for logger in trainer.loggers:
        logger.log_metrics(means, step=trainer.global_step)
    Console().print(results_table(metrics, output_dir, model.fixed_threshold))
    return metrics
