from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from idc_lightning.data.splits import (
    SplitError,
    check_split,
    read_split_file,
    split_patients,
    split_summary,
)


def manifest_of(patients: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(patients):
        size = int(rng.integers(50, 400))
        fraction = 0.0 if p % 7 == 0 else rng.uniform(0.05, 0.7)
        labels = (rng.random(size) < fraction).astype(int)
        rows += [(f"{9000 + p}", 1 + 50 * i, 1, label, "") for i, label in enumerate(labels)]
    return pd.DataFrame(rows, columns=["patient_id", "x", "y", "label", "path"])


def test_patient_level_stratified_and_deterministic() -> None:
    manifest = manifest_of(100)
    split = split_patients(manifest, seed=7)
    assert split.patient_id.is_unique and set(split.patient_id) == set(manifest.patient_id)
    counts = split.split.value_counts()
    assert (counts["train"], counts["val"], counts["test"]) == (70, 15, 15)
    summary = split_summary(manifest, split)
    overall = 100 * manifest.label.mean()
    assert (summary.idc_pct - overall).abs().max() < 6
    assert split.equals(split_patients(manifest, seed=7))
    assert not split.equals(split_patients(manifest, seed=8))


def test_folds_rotate_validation_over_a_fixed_test_set() -> None:
    manifest = manifest_of(40)
    folds = [split_patients(manifest, num_folds=5, fold=k) for k in range(5)]
    tests = [set(f.patient_id[f.split == "test"]) for f in folds]
    assert all(t == tests[0] for t in tests)
    vals = [set(f.patient_id[f.split == "val"]) for f in folds]
    assert set().union(*vals) == set(manifest.patient_id) - tests[0]
    assert sum(len(v) for v in vals) == len(set().union(*vals))
    with pytest.raises(SplitError, match="data.fold=5"):
        split_patients(manifest, num_folds=5, fold=5)


def test_too_few_patients_is_a_clear_error() -> None:
    with pytest.raises(SplitError, match="2 patients cannot fill") as no_folds:
        split_patients(manifest_of(2))
    assert "num_folds" not in str(no_folds.value) and "data.test_fraction=0 test=false" in str(no_folds.value)
    with pytest.raises(SplitError, match="1 patients cannot fill") as one:
        split_patients(manifest_of(1))
    assert "test_fraction" not in str(one.value)  # without a test split 1 patient is still too few
    with pytest.raises(SplitError, match="5 patients cannot fill.*at least 6.*reduce data.num_folds"):
        split_patients(manifest_of(5), num_folds=5)


def test_single_class_split_warns_with_numbers(caplog: pytest.LogCaptureFixture) -> None:
    manifest = manifest_of(3)
    manifest["label"] = 0
    summary = split_summary(manifest, split_patients(manifest))
    warnings = check_split(summary)
    assert len(warnings) == 3 and "no IDC-positive patch" in warnings[0] and "AUROC is undefined" in warnings[0]


def test_split_file_round_trip_and_errors(tmp_path) -> None:
    manifest = manifest_of(10)
    split = split_patients(manifest)
    path = tmp_path / "splits.csv"
    split.to_csv(path, index=False)
    assert read_split_file(path, manifest).equals(split)
    split.iloc[:9].to_csv(path, index=False)
    assert len(read_split_file(path, manifest)) == 9
    pd.DataFrame({"patient_id": ["1"], "split": ["train"]}).to_csv(path, index=False)
    with pytest.raises(SplitError, match="not under data.root"):
        read_split_file(path, manifest, required=("train",))
    with pytest.raises(FileNotFoundError, match="data.split_file"):
        read_split_file(tmp_path / "missing.csv", manifest)


def test_split_file_listing_a_patient_twice_is_an_error(tmp_path) -> None:
    manifest = manifest_of(10)
    split = split_patients(manifest)
    leaked = split.patient_id[split.split == "train"].iloc[0]
    path = tmp_path / "splits.csv"
    pd.concat([split, pd.DataFrame({"patient_id": [leaked], "split": ["test"]})]).to_csv(path, index=False)
    with pytest.raises(SplitError, match=rf"listed more than once \({leaked}: \['train', 'test'\]\)"):
        read_split_file(path, manifest)


def test_split_file_must_fill_the_required_splits(tmp_path) -> None:
    manifest = manifest_of(10)
    split = split_patients(manifest)
    path = tmp_path / "splits.csv"
    split[split.split != "val"].to_csv(path, index=False)
    with pytest.raises(SplitError, match=rf"{path}: no patient in split\(s\) \['val'\]"):
        read_split_file(path, manifest)
    split[split.split == "test"].to_csv(path, index=False)
    assert set(read_split_file(path, manifest, required=("test",)).split) == {"test"}
    with pytest.raises(SplitError, match=r"\['train', 'val'\]"):
        read_split_file(path, manifest)


def test_test_fraction_zero_holds_out_no_patient() -> None:
    manifest = manifest_of(25)
    split = split_patients(manifest, val_fraction=0.15, test_fraction=0.0)
    assert set(split.split) == {"train", "val"} and len(split) == 25
    assert (split.split == "val").sum() == 4
    folds = split_patients(manifest, test_fraction=0.0, num_folds=5, fold=2)
    assert set(folds.split) == {"train", "val"} and (folds.split == "val").sum() == 5


@pytest.mark.parametrize(("val_fraction", "test_fraction", "named"),
                         [(0.15, -0.1, "test_fraction"), (0.15, 1.0, "test_fraction"), (0.0, 0.15, "val_fraction"),
                          (0.9, 0.15, "val_fraction")])
def test_impossible_fractions_are_a_clear_error(val_fraction: float, test_fraction: float, named: str) -> None:
    with pytest.raises(SplitError, match=f"data.{named}="):
        split_patients(manifest_of(25), val_fraction=val_fraction, test_fraction=test_fraction)


def test_val_fraction_is_not_checked_when_folds_choose_validation() -> None:
    split = split_patients(manifest_of(25), val_fraction=0.0, num_folds=5, fold=0)
    assert (split.split == "val").sum() >= 4
