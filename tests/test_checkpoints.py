"""A checkpoint describes its run: eval and predict reproduce training from the checkpoint alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, compose_config

from idc_lightning import __version__
from idc_lightning.checkpoints import CheckpointError, preprocessing_settings, read_checkpoint
from idc_lightning.eval import evaluate
from idc_lightning.predict import predict
from idc_lightning.train import train

NON_DEFAULT = ["data.image_size=64", "data.stain_norm=macenko", "model.adapt_stem=true"]
REPRODUCED = ("test/auroc", "test/auprc", "test/f1", "test/bal_acc", "test/f1@val_thr", "test/bal_acc@val_thr",
              "test/tp", "test/fp", "test/tn", "test/fn", "test/val_threshold", "test/patient_mean_specificity",
              "test/ece")


@pytest.fixture(scope="module")
def trained_run(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, float]]:
    run = tmp_path_factory.mktemp("run")
    overrides = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "callbacks.heatmap=null", *NON_DEFAULT]
    metrics = train(compose_config("train", run, tiny_data_dir, overrides))
    return run, metrics


def _checkpoint(run: Path) -> Path:
    return next((run / "checkpoints").glob("epoch_*.ckpt"))


def test_checkpoint_carries_preprocessing_patients_and_operating_point(trained_run) -> None:
    run, metrics = trained_run
    checkpoint = read_checkpoint(_checkpoint(run))
    pre = checkpoint.preprocessing
    assert (pre.image_size, pre.stain_norm, pre.patch_size, pre.microns_per_pixel) == (64, "macenko", 50, 4.0)
    assert len(pre.stain_vectors) == 2 and len(pre.max_concentrations) == 2
    assert checkpoint.hyper_parameters["adapt_stem"] is True and checkpoint.hyper_parameters["pretrained"] is False
    splits = pd.read_csv(run / "splits.csv", dtype=str)
    assert {name: sorted(ids) for name, ids in checkpoint.patients.items()} == {
        name: sorted(splits.patient_id[splits.split == name]) for name in ("train", "val", "test")}
    point = checkpoint.operating_point
    assert (point.method, point.chosen_on, point.rule) == ("youden", "val", "prob >= threshold")
    assert point.threshold == pytest.approx(metrics["test/val_threshold"])
    assert checkpoint.package_version == __version__ and len(checkpoint.manifest_fingerprint) == 16


def test_eval_and_predict_reproduce_training_from_the_checkpoint_alone(trained_run, tiny_data_dir: Path,
                                                                       tmp_path: Path) -> None:
    run, trained = trained_run
    evaluated = evaluate(compose_config("eval", tmp_path / "eval", tiny_data_dir, [f"ckpt_path={_checkpoint(run)}"]))
    for key in REPRODUCED:
        assert evaluated[key] == pytest.approx(trained[key], abs=1e-6, nan_ok=True), key
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["test/f1@val_thr"] == pytest.approx(
        trained["test/f1@val_thr"], abs=1e-6)

    tested = pd.read_parquet(run / "predictions.parquet")
    patient = sorted(tested["patient_id"].unique())[0]
    patient_dir = next(tiny_data_dir.glob(f"synthetic_*/IDC_regular_ps50_idx5/{patient}"))
    predicted = predict(compose_config("predict", tmp_path / "predict", tiny_data_dir,
                                       [f"ckpt_path={_checkpoint(run)}", f"input={patient_dir}"]))
    paired = tested[tested["patient_id"] == patient].merge(predicted, on=["x", "y"], suffixes=("_test", "_predict"))
    assert len(paired) == (tested["patient_id"] == patient).sum() == len(predicted)
    np.testing.assert_allclose(paired["prob_predict"], paired["prob_test"], atol=1e-6)


def test_a_command_line_value_contradicting_the_checkpoint_is_named(trained_run, tiny_data_dir: Path,
                                                                     tmp_path: Path) -> None:
    run, _ = trained_run
    overrides = [f"ckpt_path={_checkpoint(run)}", "data.image_size=50", "data.stain_norm=null"]
    with pytest.raises(CheckpointError, match=r"data.image_size=50 but the checkpoint was trained with 64"):
        evaluate(compose_config("eval", tmp_path / "eval", tiny_data_dir, overrides))
    cfg = compose_config("eval", tmp_path / "eval", tiny_data_dir, [*overrides, "allow_preprocessing_change=true"])
    settings = preprocessing_settings(cfg.data, read_checkpoint(_checkpoint(run)), cfg.allow_preprocessing_change)
    assert settings["image_size"] == 50 and settings["stain_norm"] == "macenko" and settings["mean"] == [
        0.485, 0.456, 0.406]


def test_foreign_checkpoints_are_refused_with_the_reason(tmp_path: Path) -> None:
    torch.save({"state_dict": {"backbone.conv1.weight": torch.zeros(1)}, "hyper_parameters": {}},
               tmp_path / "bare.ckpt")
    with pytest.raises(CheckpointError, match="lacks .*preprocessing, operating point and patients"):
        read_checkpoint(tmp_path / "bare.ckpt")


@pytest.mark.slow
def test_eval_cli_needs_only_the_checkpoint(trained_run, tmp_path: Path) -> None:
    """No data, model or preprocessing option: the tree, the model and its settings all come from the checkpoint."""
    run, trained = trained_run
    command = [sys.executable, "-m", "idc_lightning.eval", f"ckpt_path={_checkpoint(run)}", "extras.print_config=false",
               "trainer.accelerator=cpu", "data.num_workers=0", f"paths.cache_dir={tmp_path / 'cache'}",
               f"hydra.run.dir={tmp_path / 'eval'}"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["test/auroc"] == pytest.approx(trained["test/auroc"], abs=1e-6)


def test_a_checkpoint_from_before_spatial_context_scores_each_patch_alone(trained_checkpoint: Path,
                                                                          tmp_path: Path) -> None:
    state = torch.load(trained_checkpoint, weights_only=True)
    assert state["hyper_parameters"]["context_sigma"] > 0
    del state["hyper_parameters"]["context_sigma"]
    torch.save(state, tmp_path / "older.ckpt")
    model = read_checkpoint(tmp_path / "older.ckpt").model()
    predictions = pd.DataFrame({"patient_id": "p", "x": [1, 51, 101], "y": [1, 1, 1], "patch_prob": [0.1, 0.9, 0.1]})
    assert model.hparams.context_sigma == 0
    assert model.in_context(predictions) == pytest.approx([0.1, 0.9, 0.1])
