"""MODEL_CARD.md from a checkpoint and its test results: what the model is for, what it saw, how good it is."""

from __future__ import annotations

import math
from pathlib import Path

from idc_lightning.checkpoints import RunCheckpoint

CARD_METRICS = (
    ("test/auroc", "AUROC (patches)"),
    ("test/auprc", "AUPRC (patches)"),
    ("test/f1@val_thr", "F1 at the operating point"),
    ("test/bal_acc@val_thr", "balanced accuracy at the operating point"),
    ("test/sensitivity@val_thr", "sensitivity at the operating point"),
    ("test/specificity@val_thr", "specificity at the operating point"),
    ("test/ece", "expected calibration error (15 bins)"),
    ("test/patient_mean_auroc", "mean AUROC over test patients"),
    ("test/patient_mean_f1", "mean F1 over test patients with IDC"),
    ("test/patient_mean_specificity", "mean specificity over test patients"),
)


def _number(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _context_sentence(sigma: float) -> str:
    if not sigma:
        return "Each patch is scored alone (no spatial context)."
    return (f"The threshold applies to probabilities in spatial context: each patch's probability is the Gaussian-"
            f"weighted mean (sigma {sigma:g} patch widths) of its own and its neighbours' on the same slide, glass "
            "left out (`idc_lightning.evaluation.spatial_context`). `predict` applies it; the exported network "
            "gives the patch-alone probability, so apply the same smoothing before the threshold.")


def model_card(checkpoint: RunCheckpoint, metrics: dict[str, float]) -> str:
    """The card's Markdown; `metrics` are the run's results.json (empty when the checkpoint was never tested)."""
    pre, point, patients = checkpoint.preprocessing, checkpoint.operating_point, checkpoint.patients
    hparams = checkpoint.hyper_parameters
    counts = {name: len(patients.get(name, [])) for name in ("train", "val", "test")}
    lines = [
        "# Model card: IDC patch classifier (ResNet-18)",
        "",
        f"Checkpoint `{checkpoint.path.name}`, written by idc_lightning {checkpoint.package_version}.",
        "",
        "## Intended use",
        "",
        "Research on breast histopathology: the probability that a 50×50-px H&E patch at "
        f"{pre.microns_per_pixel:g} µm/px shows invasive ductal carcinoma (IDC), and per-patient heatmaps built "
        "from it. Not a medical device: not for diagnosis or treatment decisions.",
        "",
        "## Data and split",
        "",
        f"Patients split by patient (never by patch): {counts['train']} train, {counts['val']} validation (checkpoint "
        f"and operating point chosen there), {counts['test']} test. Manifest fingerprint of the training and "
        f"validation patches: `{checkpoint.manifest_fingerprint}`.",
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
        f"A patch is called IDC when {point.rule}, threshold {point.threshold:.4f}, chosen by {point.method} on the "
        f"{point.chosen_on} patients. Calibration: {hparams.get('calibrate') or 'none'}"
        + (f" (temperature {float(checkpoint.state['temperature']):.3f} fitted on validation)"
           if "temperature" in checkpoint.state else "") + ".",
        "",
        _context_sentence(hparams.get("context_sigma", 0.0)),
        "",
        "## Test results (held-out patients)",
        "",
        "| metric | value |",
        "|---|---:|",
        *(f"| {label} | {_number(metrics.get(key))} |" for key, label in CARD_METRICS),
        "",
        "## Limits",
        "",
        "- Patch labels come from coarse pathologist outlines: tumour borders are partly mislabelled, which caps "
        "patch-level scores.",
        "- Trained on one scanner's 40× scans at one scale: slides at another scale must be resampled to "
        f"{pre.microns_per_pixel:g} µm/px; other stains, scanners and institutions need their own validation.",
        f"- {counts['train']} training patients; the figures above come from {counts['test']} test patients and "
        "vary from patient to patient (see patients.csv).",
        "",
    ]
    return "\n".join(lines)


def write_model_card(path: Path, checkpoint: RunCheckpoint, metrics: dict[str, float]) -> Path:
    path.write_text(model_card(checkpoint, metrics))
    return path
