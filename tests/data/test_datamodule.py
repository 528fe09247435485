from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch
from hydra.utils import instantiate

from idc_lightning.data.datamodule import IDCDataModule, sampling_weights
from idc_lightning.data.input_files import UNUSED_FILES
from idc_lightning.data.splits import SplitError
from idc_lightning.data.synthetic import TREE, SyntheticSlides


@pytest.fixture
def datamodule(make_cfg) -> IDCDataModule:
    dm = instantiate(make_cfg("train").data)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_setup_splits_by_patient_and_writes_splits_csv(datamodule: IDCDataModule, tmp_path: Path) -> None:
    patients = {name: set(datamodule.split_frame(name).patient_id) for name in ("train", "val", "test")}
    assert not patients["train"] & patients["val"] and not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    saved = pd.read_csv(tmp_path / "run" / "splits.csv", dtype=str)
    assert list(saved.columns) == ["patient_id", "split"] and len(saved) == 12
    rows = sum(len(datamodule.split_frame(name)) for name in ("train", "val", "test"))
    assert rows == len(datamodule.cache.rows)


def test_class_weights_are_inverse_training_frequency(datamodule: IDCDataModule) -> None:
    labels = datamodule.split_frame("train").label
    weights = datamodule.balancing_class_weights()
    assert torch.allclose(weights * torch.tensor([(labels == 0).sum(), (labels == 1).sum()]).float(),
                          torch.full((2,), len(labels) / 2.0))


def test_cpu_and_device_paths_give_the_same_eval_batch(make_cfg) -> None:
    batches = {}
    for mode in ("cpu", "device"):
        dm = instantiate(make_cfg("train", [f"data.augment_on={mode}"]).data)
        dm.prepare_data()
        dm.setup("test")
        batches[mode] = next(iter(dm.test_dataloader()))
    raw = batches["device"]["image"]
    assert raw.dtype == torch.uint8 and raw.shape[1:] == (50, 50, 3)
    batches["device"]["image"] = dm.batch_augment(raw, train=False)
    assert torch.equal(batches["cpu"]["index"], batches["device"]["index"])
    assert torch.allclose(batches["cpu"]["image"], batches["device"]["image"], atol=1e-5)


def test_balanced_sampler_draws_both_classes_evenly(make_cfg) -> None:
    dm = instantiate(make_cfg("train", ["data.sampler=balanced", "data.batch_size=64"]).data)
    dm.prepare_data()
    dm.setup("fit")
    labels = torch.cat([batch["label"] for batch in dm.train_dataloader()])
    assert 0.35 < labels.float().mean() < 0.65
    # The sampler already evens the classes out: inverse-frequency loss weights on top would correct twice.
    assert torch.equal(dm.balancing_class_weights(), torch.ones(2))


def test_patient_sampler_gives_every_patient_equal_mass() -> None:
    frame = pd.DataFrame({"patient_id": ["a"] * 9 + ["b"] * 3, "label": [0] * 6 + [1] * 3 + [1] * 3})
    draws = sampling_weights(frame, "patient")
    assert draws.sum() == pytest.approx(2.0)
    assert draws[frame.patient_id == "a"].sum() == pytest.approx(draws[frame.patient_id == "b"].sum())
    assert sampling_weights(frame, "random") is None
    with pytest.raises(ValueError, match="data.sampler='patients'"):
        sampling_weights(frame, "patients")


def test_patient_sampler_weights_the_loss_by_the_classes_it_draws(make_cfg) -> None:
    dm = instantiate(make_cfg("train", ["data.sampler=patient", "data.batch_size=64"]).data)
    dm.prepare_data()
    dm.setup("fit")
    train = dm.split_frame("train")
    assert torch.allclose(dm.train_dataloader().sampler.weights, torch.as_tensor(sampling_weights(train, "patient")))
    # 18% IDC among the patches, but half of what is drawn: patient b's 9 IDC patches are drawn as often as a's 81
    # non-IDC ones, so the classes need no weighting.
    dm.frames["train"] = pd.DataFrame({"patient_id": ["a"] * 90 + ["b"] * 10,
                                       "label": [1] * 9 + [0] * 81 + [1] * 9 + [0]})
    assert dm.balancing_class_weights().tolist() == pytest.approx([1.0, 1.0])
    dm.sampler = "random"
    assert dm.balancing_class_weights().tolist() == pytest.approx([100 / 164, 100 / 36])


def test_a_class_absent_from_training_keeps_a_finite_weight(make_cfg) -> None:
    dm = instantiate(make_cfg("train", ["data.sampler=patient"]).data)
    dm.prepare_data()
    dm.setup("fit")
    dm.frames["train"] = dm.frames["train"].assign(label=0)
    assert dm.balancing_class_weights().tolist() == [0.5, 1.0]


def test_gpu_resident_loader_draws_as_the_sampler_says_unless_overfitting(make_cfg) -> None:
    dm = instantiate(make_cfg("train", ["data.loader=gpu_resident", "data.sampler=patient"]).data)
    dm.prepare_data()
    dm.setup("fit")
    expected = torch.as_tensor(sampling_weights(dm.split_frame("train"), "patient"))
    assert torch.allclose(dm.train_dataloader().sample_weights, expected)
    dm.trainer = L.Trainer(overfit_batches=2, accelerator="cpu", logger=False, enable_checkpointing=False)
    overfitting = dm.train_dataloader()
    assert overfitting.sample_weights is None and not overfitting.shuffle


def test_files_that_give_no_patch_are_listed_in_the_run_folder(tiny_data_dir: Path, make_cfg, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    tree = tmp_path / "download"
    shutil.copytree(next(tiny_data_dir.glob(f"synthetic_*/{TREE}")), tree)
    patient = sorted(p for p in tree.iterdir() if (p / "1").is_dir())[0]
    idc_patch = next((patient / "1").glob("*.png"))
    (tree / ".DS_Store").write_bytes(b"Bud1")
    shutil.copy(idc_patch, patient / "0" / idc_patch.name)
    (patient / "1" / f"{patient.name}_idx5_x9001_y9001_class1.png").write_bytes(b"truncated")
    neighbour = next(p for p in sorted(tree.iterdir()) if p.is_dir() and p != patient)
    moved = next((neighbour / "0").glob("*.png"))
    moved.rename(patient / "0" / moved.name)
    dm = instantiate(make_cfg("train", ["data=kaggle", f"data.root={tree}"]).data)
    dm.prepare_data()
    dm.setup("fit")
    assert "Patches in another patient's folder count for the patient their file name gives: 1, e.g. " \
           f"{patient.name}/0/{moved.name}" in caplog.text
    unused = pd.read_csv(tmp_path / "run" / UNUSED_FILES)
    assert sorted(zip(unused["kind"], unused["path"].map(lambda p: Path(p).name), strict=True)) == [
        ("not a patch name", ".DS_Store"),
        ("patch skipped by name", idc_patch.name),
        ("undecodable patch", f"{patient.name}_idx5_x9001_y9001_class1.png"),
    ]
    assert "3 files under" in caplog.text and str(tmp_path / "run" / UNUSED_FILES) in caplog.text
    caplog.clear()
    without_run_folder = instantiate(make_cfg("train", ["data=kaggle", f"data.root={tree}"]).data, output_dir=None)
    without_run_folder.setup("fit")
    assert "3 files under" in caplog.text and ".DS_Store: the name is not" in caplog.text


def test_gpu_resident_loader_serves_every_patch_without_workers(make_cfg) -> None:
    dm = instantiate(make_cfg("train", ["data.loader=gpu_resident"]).data)
    dm.prepare_data()
    dm.setup("fit")
    seen = torch.cat([batch["index"] for batch in dm.val_dataloader()])
    assert sorted(seen.tolist()) == list(range(len(dm.split_frame("val"))))
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert batch["image"].shape[1:] == (3, 50, 50) and batch["image"].dtype == torch.float32


def test_truth_masks_agree_with_labels(datamodule: IDCDataModule) -> None:
    frame = datamodule.split_frame("train")
    patient = frame.patient_id.iloc[0]
    rows = frame[frame.patient_id == patient]
    truth = datamodule.truth(patient, rows)
    assert truth is not None and (truth == rows.label.astype(bool)).mean() > 0.9


def test_a_generated_tree_read_as_kaggle_keeps_its_truth_but_a_copy_of_its_patches_has_none(
    make_cfg, tiny_data_dir: Path, tmp_path: Path
) -> None:
    source = next(tiny_data_dir.glob("synthetic_*/IDC_regular_ps50_idx5"))
    as_kaggle = instantiate(make_cfg("train", ["data=kaggle", f"data.root={source}"]).data)
    frame = pd.DataFrame({"x": [1], "y": [1]})
    patient = next(path.name for path in source.iterdir() if path.is_dir())
    assert as_kaggle.truth is not None and as_kaggle.truth(patient, frame) is not None
    copy = tmp_path / "copy" / "IDC_regular_ps50_idx5"
    shutil.copytree(source / patient, copy / patient)
    assert instantiate(make_cfg("train", ["data=kaggle", f"data.root={copy}"]).data).truth is None


def test_unlabelled_patches_are_left_out_of_the_splits(tmp_path: Path, tiny_data_dir: Path) -> None:
    source = next(tiny_data_dir.glob("synthetic_*/IDC_regular_ps50_idx5"))
    root = tmp_path / "root"
    for path in source.glob("*/*/*.png"):
        target = root / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    extra = root / "20000" / "new" / "20000_idx5_x9001_y9001.png"
    extra.parent.mkdir()
    extra.write_bytes(next(source.glob("*/0/*.png")).read_bytes())
    dm = IDCDataModule(root=root, cache_dir=tmp_path / "cache", num_workers=0)
    dm.setup("fit")
    assert len(dm.cache.rows) == len(list(source.glob("*/*/*.png"))) + 1
    assert sum(len(dm.split_frame(s)) for s in ("train", "val", "test")) == len(dm.cache.rows) - 1
    dm.setup("predict")
    assert len(dm.split_frame("predict")) == len(dm.cache.rows)


def test_checkpoint_state_names_patients_preprocessing_and_data(datamodule: IDCDataModule) -> None:
    state = datamodule.state_dict()
    patients = {name: set(datamodule.split_frame(name).patient_id) for name in ("train", "val", "test")}
    assert {name: set(ids) for name, ids in state["patients"].items()} == patients
    assert state["preprocessing"]["image_size"] == 50 and state["preprocessing"]["microns_per_pixel"] == 4.0
    assert len(state["manifest_fingerprint"]) == 16
    datamodule.load_state_dict(state)
    moved = {**state, "patients": {**state["patients"], "test": state["patients"]["val"],
                                   "val": state["patients"]["test"]}}
    with pytest.raises(SplitError, match="differs from this run's"):
        datamodule.load_state_dict(moved)


def test_evaluation_tests_every_unseen_patient_and_refuses_seen_ones(make_cfg, tmp_path: Path) -> None:
    data = make_cfg("train").data
    trained = instantiate(data)
    trained.prepare_data()
    trained.setup("fit")
    seen = sorted({*trained.split_frame("train").patient_id, *trained.split_frame("val").patient_id})
    evaluated = instantiate(data, seen_patients=seen)
    evaluated.setup("test")
    assert set(evaluated.split_frame("test").patient_id) == set(trained.split_frame("test").patient_id)
    leaking = tmp_path / "split.csv"
    pd.DataFrame({"patient_id": [seen[0]], "split": ["test"]}).to_csv(leaking, index=False)
    with pytest.raises(SplitError, match=f"trained or validated on: \\['{seen[0]}'\\]"):
        instantiate(data, seen_patients=seen, split_file=str(leaking)).setup("test")


def test_missing_root_error_points_to_synthetic(tmp_path: Path) -> None:
    dm = IDCDataModule(root=tmp_path / "kaggle", cache_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="data=synthetic"):
        dm.prepare_data()


def test_the_generator_never_writes_beside_a_folder_it_did_not_create(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="data=kaggle data.root=PATH"):
        IDCDataModule(root=tmp_path / "idc_real" / "9124", cache_dir=tmp_path / "cache", synthetic=SyntheticSlides())
    assert not (tmp_path / "idc_real").exists()
