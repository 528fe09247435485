"""Inference-time variants on the fold checkpoints of a `+experiment=real_cv` sweep (docs/results.md).

    python benchmarks/real_inference_variants.py DATA_ROOT SWEEP_DIR --cache-dir DIR   (train's paths.cache_dir)

For each fold's best checkpoint, the validation and test patients are predicted four ways, each scored in the
checkpoint's spatial context (model.context_sigma) as eval scores it:
- plain: as eval does (with the model's own TTA setting);
- tta: mean probability over the 8 dihedral views (what model.tta=true does);
- bn_train: BatchNorm statistics re-estimated on 8,192 un-augmented training patches (training ends with running
  means of augmented batches);
- bn_patient: BatchNorm statistics re-estimated on each patient's own patches (AdaBN), against stain shift.
Then `plain` again at each width of --sigmas instead of the checkpoint's own (sigma=0: every patch alone).
Validation AUROC decides, paired per fold against plain (the sigma rows against sigma=0); the test columns use
each variant's own threshold, chosen on validation by the checkpoint's model.threshold_method. The last lines
average the folds' test probabilities (the fold ensemble).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from idc_lightning.checkpoints import RunCheckpoint, read_checkpoint
from idc_lightning.data.cache import PatchCache, build_cache
from idc_lightning.data.manifest import build_manifest
from idc_lightning.evaluation.metrics import binary_metrics
from idc_lightning.evaluation.operating_point import choose_threshold
from idc_lightning.evaluation.spatial_context import smooth_patient_probabilities
from idc_lightning.models.classifier import IDCClassifier

BATCH = 512
TRAIN_SAMPLE = 8192
# Settings the packed cache depends on: every fold must share them to share one cache.
CACHE_SETTINGS = ("patch_size", "pad_value", "stain_norm")


def _inputs(cache: PatchCache, checkpoint: RunCheckpoint, rows: np.ndarray) -> torch.Tensor:
    """Network inputs of the given `cache.rows` positions (rows, not image indices: skipped files leave gaps)."""
    pre = checkpoint.preprocessing
    if pre.image_size != pre.patch_size:
        raise SystemExit(f"{checkpoint.path}: image_size {pre.image_size} != patch_size; this script does not resize")
    images = cache.images[cache.rows["cache_index"].to_numpy()[rows]]
    images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
    return (images - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(1, 3, 1, 1)


@torch.no_grad()
def _probabilities(model: IDCClassifier, images: torch.Tensor, tta: bool | None = None) -> np.ndarray:
    """model.idc_probability batch by batch; `tta` overrides the model's own setting."""
    trained_tta = model.hparams.tta
    model.hparams.tta = trained_tta if tta is None else tta
    probs = torch.cat([model.idc_probability(batch) for batch in images.split(BATCH)]).numpy()
    model.hparams.tta = trained_tta
    return probs


@torch.no_grad()
def _reestimate_batchnorm(model: IDCClassifier, images: torch.Tensor) -> None:
    """Replace every BatchNorm's running statistics by the mean of their per-batch values over `images`."""
    norms = [module for module in model.modules() if isinstance(module, nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    for batch in images.split(BATCH):
        model.backbone(batch)
    for norm in norms:
        norm.eval()


def _fold_predictions(cache: PatchCache, checkpoint: RunCheckpoint, sigmas: list[float]
                      ) -> dict[str, dict[str, np.ndarray]]:
    """{variant: {split: probabilities in cache row order}} for the val and test patients, in spatial context."""
    patient = cache.rows["patient_id"].astype(str)
    rows = {}
    for split in ("train", "val", "test"):
        wanted = set(checkpoint.patients.get(split, []))
        missing = sorted(wanted - set(patient))
        if not wanted or missing:
            raise SystemExit(f"{checkpoint.path}: its {split} patients {sorted(wanted)[:5] or '(none)'} are not all "
                             f"under the data root (missing {missing[:5]}); give the tree the sweep trained on")
        rows[split] = np.flatnonzero(patient.isin(wanted).to_numpy())
    inputs = {split: _inputs(cache, checkpoint, rows[split]) for split in ("val", "test")}
    model = checkpoint.model()
    out = {"plain": {s: _probabilities(model, x) for s, x in inputs.items()},
           "tta": {s: _probabilities(model, x, tta=True) for s, x in inputs.items()}}
    sample = np.random.default_rng(0).choice(rows["train"], min(TRAIN_SAMPLE, len(rows["train"])), replace=False)
    sample.sort()
    _reestimate_batchnorm(model, _inputs(cache, checkpoint, sample))
    out["bn_train"] = {s: _probabilities(model, x) for s, x in inputs.items()}
    out["bn_patient"] = {}
    for split, x in inputs.items():
        probs = np.empty(len(x), np.float32)
        owners = patient.to_numpy()[rows[split]]
        for owner in np.unique(owners):
            model = checkpoint.model()
            _reestimate_batchnorm(model, x[owners == owner])
            probs[owners == owner] = _probabilities(model, x[owners == owner])
        out["bn_patient"][split] = probs
    places = {split: cache.rows.iloc[rows[split]][["patient_id", "x", "y"]] for split in ("val", "test")}

    def in_context(probs: dict[str, np.ndarray], sigma: float) -> dict[str, np.ndarray]:
        return {s: smooth_patient_probabilities(places[s].assign(patch_prob=p), sigma) for s, p in probs.items()}

    own_sigma = checkpoint.hyper_parameters.get("context_sigma", 0.0)
    out.update({f"sigma={sigma:g}": in_context(out["plain"], sigma) for sigma in sigmas})
    for variant in ("plain", "tta", "bn_train", "bn_patient"):
        out[variant] = in_context(out[variant], own_sigma)
    out["labels"] = {split: cache.rows["label"].to_numpy()[rows[split]] for split in ("val", "test")}
    return out


def sweep_parser(description: str) -> argparse.ArgumentParser:
    """The arguments of the scripts that score a real_cv sweep's folds: the data root, the sweep, the cache."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_root", type=Path)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--cache-dir", type=Path, required=True, help="train's paths.cache_dir")
    return parser


def sweep_folds(args: argparse.Namespace) -> tuple[list[RunCheckpoint], PatchCache]:
    """The sweep's fold checkpoints and the packed cache they share; one real_cv sweep or a clear exit."""
    checkpoints = [read_checkpoint(path) for path in sorted(args.sweep_dir.glob("*/checkpoints/epoch_*.ckpt"))]
    if not checkpoints:
        raise SystemExit(f"no */checkpoints/epoch_*.ckpt under {args.sweep_dir}: give a real_cv sweep folder")
    settings = {tuple(getattr(c.preprocessing, key) for key in CACHE_SETTINGS) for c in checkpoints}
    tests = {tuple(sorted(c.patients.get("test", []))) for c in checkpoints}
    if len(settings) > 1 or len(tests) > 1:
        raise SystemExit(f"{args.sweep_dir}: the folds differ in {CACHE_SETTINGS} ({settings}) or in their test "
                         f"patients; give one real_cv sweep")
    manifest, _ = build_manifest(args.data_root, args.cache_dir)
    cache_settings = dict(zip(CACHE_SETTINGS, settings.pop(), strict=True))
    return checkpoints, build_cache(manifest, args.data_root, args.cache_dir, **cache_settings, workers=1)


def main() -> None:
    parser = sweep_parser(__doc__)
    parser.add_argument("--sigmas", default="0,0.5,0.75,1,1.5,2,3",
                        help="context widths (patch widths, comma-separated) to score plain at")
    args = parser.parse_args()
    sigmas = [float(sigma) for sigma in args.sigmas.split(",")]
    checkpoints, cache = sweep_folds(args)
    records, test_probs, thresholds = [], {}, {}
    for checkpoint in checkpoints:
        fold = checkpoint.path.parent.parent.name
        predictions = _fold_predictions(cache, checkpoint, sigmas)
        labels = predictions.pop("labels")
        for variant, probs in predictions.items():
            threshold = choose_threshold(probs["val"], labels["val"], checkpoint.hyper_parameters["threshold_method"])
            val = binary_metrics(probs["val"], labels["val"], threshold)
            test = binary_metrics(probs["test"], labels["test"], threshold)
            records.append({"fold": fold, "variant": variant, "val/auroc": val["auroc"], "test/auroc": test["auroc"],
                            "test/f1@val_thr": test["f1"], "test/bal_acc@val_thr": test["bal_acc"]})
            print(records[-1], flush=True)
            test_probs.setdefault(variant, []).append(probs["test"])
            thresholds.setdefault(variant, []).append(threshold)
    table = pd.DataFrame(records)
    val_auroc = table.set_index(["variant", "fold"])["val/auroc"]
    columns = list(table.columns)[2:]
    print("| variant | folds | " + " | ".join(columns) + " | Δ val/auroc vs plain (sigma rows: vs sigma=0) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for variant, jobs in table.groupby("variant", sort=False):
        cells = [f"{jobs[c].mean():.3f} ± {jobs[c].std():.3f}" for c in columns]
        reference = "sigma=0" if variant.startswith("sigma=") and "sigma=0" in val_auroc else "plain"
        change = jobs.set_index("fold")["val/auroc"] - val_auroc[reference]
        print(f"| {variant} | {len(jobs)} | " + " | ".join(cells) + f" | {change.mean():+.3f} ± {change.std():.3f} |")
    for variant, probs in test_probs.items():
        ensemble = binary_metrics(np.mean(probs, axis=0), labels["test"], float(np.mean(thresholds[variant])))
        print(f"fold ensemble, {variant}: test AUROC {ensemble['auroc']:.3f}, at the mean fold threshold F1 "
              f"{ensemble['f1']:.3f}, balanced accuracy {ensemble['bal_acc']:.3f}")


if __name__ == "__main__":
    main()
