"""SweepSummary: after a multirun, one table of every job (summary.csv) and the mean ± std per setting (summary.md).

A job folder is one with `.hydra/overrides.yaml`; it succeeded when it wrote `results.json`. Hydra catches a failed
job's exception into its JobReturn, so `on_job_end` writes the traceback to `<job>/error.txt` and refreshes the
summary: the basic sweeper raises the first failure after the batch and then skips `on_multirun_end`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

# Test metrics at the operating point chosen on validation (never at a threshold tuned on test), and per patient;
# patch_auroc scores each patch alone, without the spatial context the others include.
SUMMARY_METRICS = ("test/auroc", "test/auprc", "test/f1@val_thr", "test/bal_acc@val_thr", "test/patient_mean_auroc",
                   "test/patient_mean_f1", "test/patch_auroc", "val/auroc")
# Folds of one setting are replicates: their spread is what mean ± std reports.
REPLICATE_KEYS = ("data.fold",)
ERROR_FILE = "error.txt"
# The run folder, inside the sweep folder, of the jobs tested as one model (callbacks/fold_ensemble_eval.py).
ENSEMBLE_DIR = "ensemble"
ERROR_LINES = 15


def override_key(override: str) -> str:
    """`+experiment=demo` → `experiment`; `~callbacks.heatmap` → `callbacks.heatmap`."""
    return override.split("=", 1)[0].lstrip("+~")


def parse_overrides(overrides: Sequence[str]) -> dict[str, str]:
    parsed = {}
    for override in overrides:
        key = override_key(override)
        parsed[key] = override.split("=", 1)[1] if "=" in override else "<deleted>"
    return parsed


def _job_sort_key(job: str) -> tuple[int, int | str]:
    return (0, int(job)) if job.isdigit() else (1, job)


def job_error(job_dir: Path, task_name: str = "train") -> str:
    """Why a job left no results.json: its error.txt, else the tail of a log holding a Traceback."""
    if (job_dir / ERROR_FILE).is_file():
        return _tail((job_dir / ERROR_FILE).read_text(errors="replace"))
    for log_file in [job_dir / f"{task_name}.log", *sorted(job_dir.glob("*.log"))]:
        if log_file.is_file():
            text = log_file.read_text(errors="replace")
            if "Traceback" in text:
                return _tail(text[text.rindex("Traceback"):])
    return "no results.json"


def error_headline(error: str) -> str:
    """The exception line of a traceback tail (Hydra appends context such as `full_key: model` after it)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    named = [line for line in lines if "Error" in line or "Exception" in line]
    return (named or lines or ["?"])[-1]


def _tail(text: str, lines: int = ERROR_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def read_job(job_dir: Path, task_name: str = "train") -> dict[str, Any]:
    """One summary row: job, its overrides, the metrics of results.json, run folder, status and error."""
    overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or []
    row: dict[str, Any] = {"job": job_dir.name, **parse_overrides(overrides)}
    results = job_dir / "results.json"
    if results.is_file():
        metrics = json.loads(results.read_text())
        row.update({k: (math.nan if v is None else v) for k, v in metrics.items()})
        row.update(status="completed", error="")
    else:
        row.update(status="failed", error=job_error(job_dir, task_name))
    row["run_dir"] = str(job_dir)
    return row


def job_folders(sweep_dir: Path) -> list[Path]:
    """The job folders of a sweep (those Hydra wrote .hydra/overrides.yaml into), in job order; the folds'
    ensemble evaluation, an eval run inside the sweep folder, is not a job."""
    folders = (p.parent.parent for p in Path(sweep_dir).glob("*/.hydra/overrides.yaml"))
    return sorted((f for f in folders if f.name != ENSEMBLE_DIR), key=lambda p: _job_sort_key(p.name))


def collect_jobs(sweep_dir: Path, task_name: str = "train") -> pd.DataFrame:
    """Every job of a sweep, in job order; columns job, overrides…, metrics…, status, error, run_dir."""
    return summary_frame([read_job(job_dir, task_name) for job_dir in job_folders(sweep_dir)])


def summary_frame(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Rows → frame with job and overrides first, then val/ and test/ metrics, then status, error, run_dir."""
    frame = pd.DataFrame(list(rows))
    if frame.empty:
        return pd.DataFrame(columns=["job", "status", "error", "run_dir"])
    tail = ["status", "error", "run_dir"]
    metrics = sorted(c for c in frame.columns if c.startswith(("val/", "test/")))
    overrides = [c for c in frame.columns if c not in ("job", *metrics, *tail)]
    return frame[["job", *overrides, *metrics, *tail]]


def override_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c not in ("job", "status", "error", "run_dir")
            and not c.startswith(("val/", "test/"))]


def varying_settings(frame: pd.DataFrame, replicate_keys: Sequence[str] = REPLICATE_KEYS) -> list[str]:
    """The overrides, other than the replicate keys, that differ between jobs (failed ones included)."""
    keys = [c for c in override_columns(frame) if c not in replicate_keys]
    return [c for c in keys if frame[c].astype(str).nunique(dropna=False) > 1]


def group_metrics(frame: pd.DataFrame, metrics: Sequence[str] = SUMMARY_METRICS,
                  replicate_keys: Sequence[str] = REPLICATE_KEYS) -> pd.DataFrame:
    """Completed jobs grouped by every override except the replicate keys (folds): n, mean and std per metric.

    Columns: the group keys that vary between jobs, n, then `<metric> mean` and `<metric> std` (sample std, NaN
    for n=1). Best val/auroc first: choosing a setting by its test score would leak the test set.
    """
    done = frame[frame["status"] == "completed"] if "status" in frame else frame
    # Varying over every job, failed ones included, so the table and the failure list use the same columns.
    varying = varying_settings(frame, replicate_keys)
    present = [m for m in metrics if m in done.columns]
    if done.empty:
        return pd.DataFrame(columns=[*varying, "n", *(f"{m} {s}" for m in present for s in ("mean", "std"))])
    values = done[present].apply(pd.to_numeric, errors="coerce")
    grouping = done[varying].astype(str).fillna("") if varying else pd.Series("all", index=done.index)
    grouped = values.groupby([grouping[c] for c in varying] if varying else grouping, sort=False)
    table = grouped.agg(["mean", "std"])
    table.columns = [f"{metric} {stat}" for metric, stat in table.columns]
    table.insert(0, "n", grouped.size())
    table = table.reset_index() if varying else table.reset_index(drop=True)
    order = "val/auroc mean" if "val/auroc mean" in table else None
    return table.sort_values(order, ascending=False, na_position="last", ignore_index=True) if order else table


def format_mean_std(mean: float, std: float, digits: int = 4) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def short_value(value: Any) -> str:
    """Optuna's 0.00019182157424526137 reads as 0.0001918 in a table; other values stay as given."""
    text = str(value)
    try:
        number = float(text)
    except ValueError:
        return text
    return f"{number:.4g}" if len(text) > 8 and math.isfinite(number) else text


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def ensemble_markdown(metrics: dict[str, Any]) -> list[str]:
    """The section on the sweep's jobs tested as one model (EvaluateFoldEnsemble's <sweep>/ensemble run)."""
    present = [m for m in SUMMARY_METRICS if m in metrics and m.startswith("test/")]
    return ["", "## The folds as one model", "",
            "The mean probability of every job's best checkpoint, called at the mean of their operating points, on "
            f"the test patients none of them trained or validated on (run folder `{ENSEMBLE_DIR}/`; "
            "`python -m idc_lightning.eval ckpt_path=<this folder>` computes the same).", "",
            markdown_table(present, [[format_mean_std(metrics[m], math.nan) for m in present]])]


def _partial_evaluations(frame: pd.DataFrame) -> list[str]:
    """A warning for figures measured on part of the patients' patches (trainer.limit_*_batches)."""
    notes = []
    for split, limit in (("val", "limit_val_batches"), ("test", "limit_test_batches")):
        column = f"{split}/coverage"
        if column in frame and (pd.to_numeric(frame[column]) < 1).any():
            notes += [f"**Partial {split}**: jobs scored as little as {pd.to_numeric(frame[column]).min():.1%} of "
                      f"their {split} patches (`trainer.{limit}`), so the {split} figures describe part of each "
                      "patient.", ""]
    return notes


def summary_markdown(frame: pd.DataFrame, metrics: Sequence[str] = SUMMARY_METRICS,
                     replicate_keys: Sequence[str] = REPLICATE_KEYS, title: str = "Sweep summary",
                     ensemble: dict[str, Any] | None = None, shared: Sequence[str] = ()) -> str:
    """Mean ± std per setting (n = completed jobs, e.g. folds), the overrides every job shares (as Hydra recorded
    them, prefixes included, so they paste back into a command), failures, and the jobs' ensemble when it was
    tested."""
    table = group_metrics(frame, metrics, replicate_keys)
    present = [m for m in metrics if f"{m} mean" in table.columns]
    keys = [c for c in table.columns if c != "n" and not c.endswith((" mean", " std"))]
    failed = frame[frame["status"] == "failed"] if "status" in frame else frame.iloc[:0]
    lines = [f"# {title}", "", f"{len(frame)} jobs: {len(frame) - len(failed)} completed, {len(failed)} failed. "
             f"Mean ± std over the jobs of each setting (replicates: {', '.join(replicate_keys)}); "
             "sorted by val/auroc.", "", *_partial_evaluations(frame)]
    if shared:
        lines += ["Shared overrides: " + " ".join(f"`{override}`" for override in shared), ""]
    rows = [[*(short_value(row[k]) for k in keys), int(row["n"]),
             *(format_mean_std(row[f"{m} mean"], row[f"{m} std"]) for m in present)] for _, row in table.iterrows()]
    lines.append(markdown_table([*keys, "n", *present], rows))
    if len(failed):
        lines += ["", "## Failed jobs", ""]
        errors = [[job, *(short_value(row[k]) for k in keys), error_headline(row["error"])]
                  for job, (_, row) in zip(failed["job"], failed.iterrows(), strict=True)]
        lines.append(markdown_table(["job", *keys, "error (full tail in summary.csv)"], errors))
    if ensemble:
        lines += ensemble_markdown(ensemble)
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    """Parallel launchers (submitit) finish jobs at once: never leave a half-written summary."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(text)
    partial.replace(path)


def ensemble_results(sweep_dir: Path) -> dict[str, Any] | None:
    """The folds' ensemble metrics, if they were computed after every job's results (not left from a rerun)."""
    path = Path(sweep_dir) / ENSEMBLE_DIR / "results.json"
    if not path.is_file():
        return None
    jobs = [job / "results.json" for job in job_folders(sweep_dir) if (job / "results.json").is_file()]
    if any(job.stat().st_mtime > path.stat().st_mtime for job in jobs):
        return None
    return json.loads(path.read_text())


def shared_overrides(sweep_dir: Path) -> list[str]:
    """The overrides every job of the sweep was given, as Hydra recorded them (.hydra/overrides.yaml), in the
    first job's order."""
    listed = [yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or [] for job in job_folders(sweep_dir)]
    return [override for override in (listed[0] if listed else []) if all(override in job for job in listed[1:])]


def write_summary(sweep_dir: Path, task_name: str = "train") -> pd.DataFrame:
    sweep_dir = Path(sweep_dir)
    frame = collect_jobs(sweep_dir, task_name)
    ensemble = ensemble_results(sweep_dir)
    _write_atomic(sweep_dir / "summary.csv", frame.to_csv(index=False))
    _write_atomic(sweep_dir / "summary.md", summary_markdown(frame, title=f"Sweep {sweep_dir.name}",
                                                             ensemble=ensemble, shared=shared_overrides(sweep_dir)))
    return frame


class SweepSummary(Callback):
    """Hydra callback (hydra.callbacks): summary.csv and summary.md in the sweep folder of every multirun."""

    def __init__(self, task_name: str | None = None) -> None:
        self.task_name = task_name

    def _task_name(self, config: DictConfig) -> str:
        return self.task_name or str(config.get("task_name", None) or config.hydra.job.name)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        output_dir = Path(str(config.hydra.runtime.output_dir))
        if job_return.status == JobStatus.FAILED and output_dir.is_dir():
            error = job_return._return_value
            text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
            (output_dir / ERROR_FILE).write_text(text)
        if "MULTIRUN" in str(config.hydra.mode):
            self._summarise(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        frame = self._summarise(config)
        if frame is not None:
            log.info("Sweep summary (%d jobs): %s", len(frame), Path(config.hydra.sweep.dir) / "summary.md")

    def _summarise(self, config: DictConfig) -> pd.DataFrame | None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return None
        try:
            return write_summary(sweep_dir, self._task_name(config))
        except (OSError, ValueError, KeyError, yaml.YAMLError):  # a broken summary must not fail its sweep
            log.exception("Could not write the sweep summary in %s", sweep_dir)
            return None
