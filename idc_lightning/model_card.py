"""MODEL_CARD.md from a checkpoint and its test results: what the model is for, what it saw, how good it is."""

from __future__ import annotations

import math
import os
from pathlib import Path

from idc_lightning.checkpoints import EnsembleCheckpoint, RunCheckpoint
from idc_lightning.evaluation.calibration import ECE_BINS
from idc_lightning.evaluation.operating_point import OperatingPoint

CARD_METRICS = (
    ("test/auroc", "AUROC (patches)"),
    ("test/auprc", "AUPRC (patches)"),
    ("test/f1@val_thr", "F1 at the operating point"),
    ("test/bal_acc@val_thr", "balanced accuracy at the operating point"),
    ("test/sensitivity@val_thr", "sensitivity at the operating point"),
    ("test/specificity@val_thr", "specificity at the operating point"),
    ("test/ece", f"expected calibration error ({ECE_BINS} bins)"),
    ("test/patient_mean_auroc", "mean AUROC over test patients"),
    ("test/patient_mean_f1", "mean F1 over test patients with IDC"),
    ("test/patient_mean_specificity", "mean specificity over test patients"),
)

NOT_TESTED = ("Not tested: `python -m idc_lightning.eval ckpt_path=<this checkpoint or folder>` writes the test "
              "results to its run folder's results.json; `export results=<that file>` puts them here.")


def _number(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _context_sentence(sigma: float) -> str:
    if not sigma:
        return "Each patch is scored alone (no spatial context)."
    return (f"The threshold applies to probabilities in spatial context: each patch's probability is the Gaussian-"
            f"weighted mean (sigma {sigma:g} patch widths) of its own and its neighbours' on the same slide, glass "
            "left out (`idc_lightning.evaluation.spatial_context`). `predict` applies it; the exported network "
            "gives the patch-alone probability, so apply the same smoothing before the threshold.")


def _members(checkpoint: RunCheckpoint | EnsembleCheckpoint) -> tuple[RunCheckpoint, ...]:
    return checkpoint.members if isinstance(checkpoint, EnsembleCheckpoint) else (checkpoint,)


def _source_sentence(checkpoint: RunCheckpoint | EnsembleCheckpoint) -> str:
    versions = ", ".join(sorted({member.package_version for member in _members(checkpoint)}))
    if not isinstance(checkpoint, EnsembleCheckpoint):
        return f"Checkpoint `{checkpoint.path.name}`, written by idc_lightning {versions}."
    paths = ", ".join(f"`{os.path.relpath(member.path, checkpoint.path)}`" for member in checkpoint.members)
    return (f"The mean probability of {len(checkpoint.members)} checkpoints under `{checkpoint.path.name}` (an "
            f"ensemble: {paths}), written by idc_lightning {versions}.")


def _split_sentence(checkpoint: RunCheckpoint | EnsembleCheckpoint, counts: dict[str, int]) -> str:
    fingerprints = ", ".join(f"`{f}`" for f in dict.fromkeys(m.manifest_fingerprint for m in _members(checkpoint)))
    fingerprint = f"Manifest fingerprint of the training and validation patches: {fingerprints}."
    if not isinstance(checkpoint, EnsembleCheckpoint):
        return (f"Patients split by patient (never by patch): {counts['train']} train, {counts['val']} validation "
                f"(checkpoint and operating point chosen there), {counts['test']} test. {fingerprint}")
    return (f"Patients split by patient (never by patch). Each of the {len(checkpoint.members)} models trained on "
            f"some of {len(checkpoint.seen_patients)} patients and chose its checkpoint and operating point on "
            f"others (the lists below are their unions); {counts['test']} test patients none of them saw. "
            f"{fingerprint}")


def _calibration_sentence(checkpoint: RunCheckpoint | EnsembleCheckpoint) -> str:
    temperatures = [float(m.state["temperature"]) for m in _members(checkpoint) if "temperature" in m.state]
    method = checkpoint.hyper_parameters.get("calibrate")
    if not method or not temperatures:
        return f"Calibration: {method or 'none'}."
    fitted = ", ".join(f"{t:.3f}" for t in temperatures)
    per_model = ", one per model" if len(temperatures) > 1 else ""
    return f"Calibration: {method} (temperature {fitted} fitted on validation{per_model})."


def _test_results(metrics: dict[str, float], test_patients: int) -> list[str]:
    # A run trained with test=false writes validation metrics only: its card says how to test, not a column of n/a.
    if not any(key.startswith("test/") for key in metrics):
        return [NOT_TESTED, ""]
    coverage = metrics.get("test/coverage")
    source = (f"From {test_patients} test patients; the figures vary from patient to patient (see patients.csv)."
              if coverage is None or coverage >= 1.0 else
              f"**Partial test**: only {coverage:.1%} of the test patches were scored (`trainer.limit_test_batches`); "
              "`python -m idc_lightning.eval ckpt_path=<this checkpoint>` scores them all.")
    return ["| metric | value |", "|---|---:|",
            *(f"| {label} | {_number(metrics.get(key))} |" for key, label in CARD_METRICS), "", source, ""]


def _operating_point_sentence(point: OperatingPoint) -> str:
    partial = ("" if point.coverage >= 1.0 else
               f" (on only {point.coverage:.1%} of their patches: `trainer.limit_val_batches`)")
    return (f"A patch is called IDC when {point.rule}, threshold {point.threshold:.4f}, chosen by {point.method} on "
            f"the {point.chosen_on} patients{partial}.")


def model_card(checkpoint: RunCheckpoint | EnsembleCheckpoint, metrics: dict[str, float]) -> str:
    """The card's Markdown; `metrics` are the run's results.json (empty or validation-only when never tested)."""
    pre, point, patients = checkpoint.preprocessing, checkpoint.operating_point, checkpoint.patients
    hparams = checkpoint.hyper_parameters
    counts = {name: len(patients.get(name, [])) for name in ("train", "val", "test")}
    lines = [
        "# Model card: IDC patch classifier (ResNet-18)",
        "",
        _source_sentence(checkpoint),
        "",
        "## Intended use",
        "",
        f"Research on breast histopathology: the probability that a {pre.patch_size}×{pre.patch_size}-px H&E patch at "
        f"{pre.microns_per_pixel:g} µm/px shows invasive ductal carcinoma (IDC), and per-patient heatmaps built "
        "from it. Not a medical device: not for diagnosis or treatment decisions.",
        "",
        "## Data and split",
        "",
        _split_sentence(checkpoint, counts),
        "",
        *(f"- {name}: {', '.join(patients.get(name, [])) or 'none'}" for name in ("train", "val", "test")),
        "",
        "## Input and preprocessing",
        "",
        f"- Patches of {pre.patch_size}×{pre.patch_size} px RGB at {pre.microns_per_pixel:g} µm/px (Kaggle: 40× scans "
        f"downsampled 16:1); smaller edge patches padded with grey level {pre.pad_value}.",
        f"- Resized to {pre.image_size}×{pre.image_size}, scaled to [0, 1], normalised with mean {list(pre.mean)} and "
        f"std {list(pre.std)}.",
        f"- Stain normalisation: {pre.stain_norm or 'none'}"
        + (f" (Macenko, per patient, to stain vectors {[list(v) for v in pre.stain_vectors]} and maximum "
           f"concentrations {list(pre.max_concentrations)})" if pre.stain_norm else "") + ".",
        f"- Architecture: ResNet-18, adapted stem {hparams.get('adapt_stem')}, dropout {hparams.get('dropout')}, "
        f"test-time augmentation over the 8 dihedral views {hparams.get('tta')}.",
        "",
        "## Operating point and calibration",
        "",
        f"{_operating_point_sentence(point)} {_calibration_sentence(checkpoint)}",
        "",
        _context_sentence(hparams.get("context_sigma", 0.0)),
        "",
        "## Test results (held-out patients)",
        "",
        *_test_results(metrics, counts["test"]),
        "## Limits",
        "",
        "- Patch labels come from coarse pathologist outlines: tumour borders are partly mislabelled, which caps "
        "patch-level scores.",
        "- Trained on one scanner's 40× scans at one scale: slides at another scale must be resampled to "
        f"{pre.microns_per_pixel:g} µm/px; other stains, scanners and institutions need their own validation.",
        f"- {counts['train']} training patients.",
        "",
    ]
    return "\n".join(lines)


def write_model_card(path: Path, checkpoint: RunCheckpoint | EnsembleCheckpoint, metrics: dict[str, float]) -> Path:
    path.write_text(model_card(checkpoint, metrics))
    return path
