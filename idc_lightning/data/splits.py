"""Patient-level train/val/test splits: patches of one patient are correlated, so a patch-level split leaks."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class SplitError(ValueError):
    """The patients on disk cannot fill the requested splits."""


def patient_idc_fractions(manifest: pd.DataFrame) -> pd.DataFrame:
    """Patches and IDC fraction per patient: the unit that is split."""
    table = manifest.groupby("patient_id")["label"].agg(patches="size", positives="sum")
    table["idc_fraction"] = table["positives"] / table["patches"]
    return table


def _exact_counts(n: int, fractions: dict[str, float]) -> dict[str, int]:
    """Largest-remainder rounding of n * fraction, with at least one patient per split."""
    total = sum(fractions.values())
    raw = {name: n * frac / total for name, frac in fractions.items()}
    counts = {name: max(1, math.floor(value)) for name, value in raw.items()}
    by_remainder = sorted(raw, key=lambda name: raw[name] - math.floor(raw[name]), reverse=True)
    for name in by_remainder[: max(0, n - sum(counts.values()))]:
        counts[name] += 1
    while sum(counts.values()) > n:
        counts[max(counts, key=counts.get)] -= 1
    return counts


def stratified_assign(idc_fraction: pd.Series, fractions: dict[str, float], seed: int) -> pd.Series:
    """Assign patients to groups so every group spans the whole range of IDC fractions.

    Patients are ordered by IDC fraction, shuffled within small blocks (the seed's only effect), then dealt
    out like Bresenham's line: each next patient goes to the group furthest below its share so far.
    """
    n = len(idc_fraction)
    if n < len(fractions):
        raise SplitError(
            f"{n} patients cannot fill {len(fractions)} groups ({', '.join(fractions)}): "
            f"add patients or reduce the number of folds"
        )
    counts = _exact_counts(n, fractions)
    rng = np.random.default_rng(seed)
    order = idc_fraction.sample(frac=1.0, random_state=rng).sort_values(kind="stable").index.to_numpy()
    block = max(1, math.ceil(n / min(counts.values())))
    for start in range(0, n, block):
        rng.shuffle(order[start : start + block])
    assigned = dict.fromkeys(counts, 0)
    groups = []
    for position in range(1, n + 1):
        name = max(counts, key=lambda g: counts[g] * position / n - assigned[g])
        assigned[name] += 1
        groups.append(name)
    return pd.Series(groups, index=order, name="split").sort_index()


def split_patients(
    manifest: pd.DataFrame,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    num_folds: int | None = None,
    fold: int = 0,
    seed: int = 0,
) -> pd.DataFrame:
    """Held-out test patients fixed by the seed; val is val_fraction of all, or fold `fold` of `num_folds`.

    With folds, the test patients stay the same for every fold and the remaining patients rotate through
    validation, so `-m data.fold=0,1,2,3,4` is a cross-validation sweep with a common test set.
    test_fraction 0 holds out no test patient (a small cohort trains on every patient but the validation ones;
    the model is tested on another tree with eval).
    """
    if not 0.0 <= test_fraction < 1.0:
        raise SplitError(f"data.test_fraction={test_fraction}: need 0 <= test_fraction < 1")
    if num_folds is None and not 0.0 < val_fraction < 1.0 - test_fraction:
        raise SplitError(f"data.val_fraction={val_fraction}, data.test_fraction={test_fraction}: need "
                         "0 < val_fraction < 1 - test_fraction")
    patients = patient_idc_fractions(manifest)
    testing = test_fraction > 0
    needed = int(testing) + (num_folds if num_folds else 2)
    if len(patients) < needed:
        raise SplitError(
            f"{len(patients)} patients cannot fill a patient-level split: at least {needed} are needed "
            f"({'test, ' if testing else ''}{'each of ' + str(num_folds) + ' folds' if num_folds else 'val and train'}"
            f"); add patients{' or reduce data.num_folds' if num_folds else ''}"
            f"{', or set data.test_fraction=0 test=false' if testing and len(patients) >= needed - 1 else ''}"
        )
    if testing:
        held_out = stratified_assign(
            patients["idc_fraction"], {"test": test_fraction, "rest": 1.0 - test_fraction}, seed
        )
    else:
        held_out = pd.Series("rest", index=patients.index, name="split")
    rest = patients.loc[held_out.index[held_out == "rest"], "idc_fraction"]
    if num_folds is None:
        inner = {"val": val_fraction, "train": 1.0 - val_fraction - test_fraction}
        development = stratified_assign(rest, inner, seed + 1)
    else:
        if not 0 <= fold < num_folds:
            raise SplitError(f"data.fold={fold} is outside 0..{num_folds - 1} (data.num_folds={num_folds})")
        folds = stratified_assign(rest, {f"fold{k}": 1.0 for k in range(num_folds)}, seed + 1)
        development = folds.map(lambda name: "val" if name == f"fold{fold}" else "train")
    split = pd.concat([held_out[held_out == "test"], development]).sort_index()
    return split.rename_axis("patient_id").reset_index()


def _read_split_csv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"data.split_file={path} does not exist; give a CSV with columns patient_id,split")
    split = pd.read_csv(path, dtype={"patient_id": str, "split": str})
    if list(split.columns[:2]) != ["patient_id", "split"]:
        raise SplitError(f"{path}: expected columns 'patient_id,split', found {list(split.columns)}")
    return split


def split_file_names(path: Path | str) -> set[str]:
    """The splits a saved split file fills: a run with data.test_fraction=0 saves train and val only."""
    return set(_read_split_csv(Path(path))["split"])


def read_split_file(path: Path | str, manifest: pd.DataFrame, required: Sequence[str] = SPLITS) -> pd.DataFrame:
    """Reuse a saved split (e.g. a paper's); patients on disk but not in the file are left out, loudly.

    `required` names the splits that must have a patient in the file: all three for training, only test for
    evaluation. A patient listed twice is an error, never resolved by row order: its patches would leak.
    """
    path = Path(path)
    split = _read_split_csv(path)
    unknown = sorted(set(split["split"]) - set(SPLITS))
    if unknown:
        raise SplitError(f"{path}: unknown split names {unknown}; use {list(SPLITS)}")
    repeated = split[split["patient_id"].duplicated(keep=False)]
    if not repeated.empty:
        listed = repeated.groupby("patient_id", sort=True)["split"].agg(list)
        details = "; ".join(f"{patient}: {splits}" for patient, splits in listed.head(10).items())
        raise SplitError(
            f"{path}: {len(listed)} patients are listed more than once ({details}); "
            f"list each patient_id once, in one split"
        )
    absent = [name for name in required if name not in set(split["split"])]
    if absent:
        raise SplitError(f"{path}: no patient in split(s) {absent}; add rows for them (required: {list(required)})")
    on_disk = set(manifest["patient_id"])
    missing = sorted(set(split["patient_id"]) - on_disk)
    if missing:
        raise SplitError(f"{path}: patients {missing[:10]} (of {len(missing)}) are not under data.root")
    unlisted = sorted(on_disk - set(split["patient_id"]))
    if unlisted:
        log.warning("%s leaves out %d patients found on disk, not used: %s", path, len(unlisted), unlisted[:20])
    return split[["patient_id", "split"]]


def split_summary(manifest: pd.DataFrame, split: pd.DataFrame) -> pd.DataFrame:
    """Patients, patches and IDC % per split, in the order train, val, test."""
    joined = manifest.merge(split, on="patient_id")
    summary = joined.groupby("split").agg(
        patients=("patient_id", "nunique"), patches=("label", "size"), positives=("label", "sum")
    )
    summary = summary.reindex(list(SPLITS), fill_value=0)
    summary["idc_pct"] = 100.0 * summary["positives"] / summary["patches"].clip(lower=1)
    return summary


def check_split(summary: pd.DataFrame, required: tuple[str, ...] = ("train", "val", "test")) -> list[str]:
    """Empty required splits are errors; single-class splits are warnings (AUROC undefined there, not a crash).

    Training needs train, val (the checkpoint and the operating point are chosen there) and test unless
    data.test_fraction=0; evaluating a trained model needs test only.
    """
    empty = [name for name in required if summary.loc[name, "patches"] == 0]
    if empty:
        raise SplitError(f"split(s) {empty} have no patches; check data.split_file or the patient count")
    warnings = []
    for row in summary.itertuples():
        if row.patches and row.positives in (0, row.patches):
            kind = "IDC-positive" if row.positives == 0 else "IDC-negative"
            warnings.append(
                f"split '{row.Index}' has no {kind} patch ({row.patches} patches of {row.patients} patients): "
                f"AUROC is undefined there and is reported as NaN"
            )
    for warning in warnings:
        log.warning(warning)
    return warnings


def unseen_patients_split(manifest: pd.DataFrame, seen: set[str]) -> pd.DataFrame:
    """Every patient not in `seen` (a checkpoint's training and validation patients) is a test patient."""
    patients = sorted(set(manifest["patient_id"].astype(str)) - set(seen))
    if not patients:
        raise SplitError(
            f"every labelled patient under data.root ({manifest['patient_id'].nunique()}) was used to train or "
            "validate this checkpoint: there is nothing unseen to test on; point data.root at other patients"
        )
    return pd.DataFrame({"patient_id": patients, "split": "test"})
