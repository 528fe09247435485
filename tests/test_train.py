from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, TINY

from idc_lightning.checkpoints import CheckpointError, read_checkpoint
from idc_lightning.data.splits import SplitError
from idc_lightning.eval import evaluate
from idc_lightning.evaluation.metrics import ranking_metrics
from idc_lightning.evaluation.spatial_context import smooth_patient_probabilities
from idc_lightning.model_card import NOT_TESTED
from idc_lightning.train import train

FAST = ["trainer.max_epochs=1", "trainer.limit_train_batches=3"]


def test_train_fits_tests_and_writes_the_run_folder(make_cfg, tmp_path: Path) -> None:
    metrics = train(make_cfg("train", FAST))
    run = tmp_path / "run"
    for name in ("splits.csv", "results.json", "predictions.parquet", "patients.csv", "roc_curve.png",
                 "pr_curve.png", "confusion_matrix.png", "checkpoints/last.ckpt", "csv/metrics.csv"):
        assert (run / name).is_file(), name
    results = json.loads((run / "results.json").read_text())
    for key in ("val/auroc", "val/f1", "val/bal_acc", "test/auroc", "test/f1", "test/bal_acc", "test/auprc",
                "test/sensitivity", "test/specificity", "test/f1@val_thr", "test/patient_mean_auroc"):
        assert key in results and (results[key] is None or 0.0 <= results[key] <= 1.0), key
    assert results["test/auroc"] == pytest.approx(metrics["test/auroc"])
    assert results["val/coverage"] == results["test/coverage"] == 1.0
    assert "Partial test" not in (run / "MODEL_CARD.md").read_text()
    assert results["val/loss"] > 0 and "test/loss" in pd.read_csv(run / "csv" / "metrics.csv").columns
    predictions = pd.read_parquet(run / "predictions.parquet")
    splits = pd.read_csv(run / "splits.csv", dtype=str)
    test_patients = set(splits.patient_id[splits.split == "test"])
    assert set(predictions.patient_id) == test_patients
    assert list(predictions.columns) == ["patient_id", "x", "y", "label", "patch_prob", "prob"]
    # Metrics and the operating point use each patch in its slide context (model.context_sigma, saved with the model).
    sigma = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]["context_sigma"]
    assert sigma > 0
    in_context = smooth_patient_probabilities(predictions, sigma)
    assert predictions["prob"].to_numpy() == pytest.approx(in_context, abs=1e-6)
    assert not np.allclose(predictions["prob"], predictions["patch_prob"])
    assert results["test/auroc"] == pytest.approx(ranking_metrics(predictions.prob, predictions.label)["auroc"])
    assert results["test/patch_auroc"] == pytest.approx(
        ranking_metrics(predictions.patch_prob, predictions.label)["auroc"])
    confusion = results["test/tp"] + results["test/fp"] + results["test/tn"] + results["test/fn"]
    assert confusion == len(predictions)
    patients = pd.read_csv(run / "patients.csv", dtype={"patient_id": str})
    assert set(patients.patient_id) == test_patients and patients.patches.sum() == len(predictions)
    assert len(list((run / "heatmaps").glob("*.png"))) == len(test_patients)


def test_results_report_the_validation_metrics_of_the_tested_checkpoint(make_cfg, tmp_path: Path) -> None:
    overrides = ["trainer.max_epochs=3", "trainer.limit_train_batches=2", "callbacks.early_stopping=null",
                 "callbacks.heatmap=null"]
    metrics = train(make_cfg("train", overrides))
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    best = next(v for k, v in state["callbacks"].items() if "val/auroc" in k)["best_model_score"]
    assert metrics["val/auroc"] == pytest.approx(float(best), abs=1e-6)
    assert json.loads((tmp_path / "run" / "results.json").read_text())["val/auroc"] == pytest.approx(float(best))


def test_eval_reproduces_the_test_metrics_of_a_checkpoint(make_cfg, tmp_path: Path) -> None:
    trained = train(make_cfg("train", FAST))
    checkpoint = next((tmp_path / "run" / "checkpoints").glob("epoch_*.ckpt"))
    evaluated = evaluate(make_cfg("eval", [f"ckpt_path={checkpoint}"], output_dir=tmp_path / "eval"))
    assert evaluated["test/auroc"] == pytest.approx(trained["test/auroc"], abs=1e-6)
    assert evaluated["test/f1@val_thr"] == pytest.approx(trained["test/f1@val_thr"], abs=1e-6)
    assert (tmp_path / "eval" / "predictions.parquet").is_file()


def test_same_seed_gives_the_same_metrics_on_cpu(make_cfg, tmp_path: Path) -> None:
    first = train(make_cfg("train", FAST, output_dir=tmp_path / "a"))
    second = train(make_cfg("train", FAST, output_dir=tmp_path / "b"))
    assert first["test/auroc"] == second["test/auroc"] and first["val/auroc"] == second["val/auroc"]


def test_resume_from_last_continues_to_the_same_end(make_cfg, tmp_path: Path) -> None:
    limits = ["trainer.limit_train_batches=2", "callbacks.early_stopping=null"]
    train(make_cfg("train", ["trainer.max_epochs=1", *limits], output_dir=tmp_path / "run"))
    resumed = make_cfg("train", ["trainer.max_epochs=2", "ckpt_path=last", *limits], output_dir=tmp_path / "run")
    train(resumed)
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4  # two epochs of two batches, not two more on top of the first


def test_bad_checkpoints_fail_with_a_clear_error(make_cfg, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        evaluate(make_cfg("eval", [f"ckpt_path={tmp_path / 'missing.ckpt'}"]))
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        evaluate(make_cfg("eval", [f"ckpt_path={tmp_path / 'junk.ckpt'}"]))
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="not a checkpoint of this model"):
        evaluate(make_cfg("eval", [f"ckpt_path={tmp_path / 'other.ckpt'}"]))


@pytest.mark.parametrize("preset", ["fdr", "limit"])
def test_debug_presets_run(make_cfg, preset: str) -> None:
    metrics = train(make_cfg("train", [f"debug={preset}"]))
    assert "test/auroc" in metrics


@pytest.mark.slow
def test_cli_runs_the_demo_experiment_on_generated_slides(tiny_data_dir: Path, tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "idc_lightning.train", "+experiment=demo", "trainer.max_epochs=1",
        "trainer.limit_train_batches=2", f"paths.data_dir={tiny_data_dir}", f"hydra.run.dir={tmp_path / 'cli'}",
        *(f"data.synthetic.{key}={value}" for key, value in TINY.items()),
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "cli" / "results.json").is_file() and (tmp_path / "cli" / ".hydra" / "config.yaml").is_file()


def test_unknown_experiment_lists_the_choices(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "idc_lightning.train", "+experiment=nope", f"hydra.run.dir={tmp_path}"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "experiment/nope" in done.stderr and "demo" in done.stderr and "resnet18" in done.stderr


def test_trainer_knobs_users_type_need_no_plus(make_cfg) -> None:
    from idc_lightning.builders import build_run

    trainer = build_run(make_cfg("train", [
        "trainer.accumulate_grad_batches=4", "trainer.gradient_clip_val=1", "trainer.gradient_clip_algorithm=value",
        "trainer.val_check_interval=0.5", "trainer.benchmark=false"])).trainer
    assert (trainer.accumulate_grad_batches, trainer.gradient_clip_val, trainer.gradient_clip_algorithm) == (
        4, 1, "value")
    assert trainer.val_check_interval == 0.5


@pytest.mark.slow
def test_cli_tune_lr_saves_the_finder_plot_and_prints_the_suggestion(tiny_data_dir: Path, tmp_path: Path) -> None:
    from test_sweeps import cli

    run = tmp_path / "tune"
    done = cli("idc_lightning.train", tiny_data_dir, "tune=lr", "tune.num_training=20", "tune.min_lr=1e-5",
               "trainer.accelerator=cpu", "trainer.accumulate_grad_batches=2", "trainer.gradient_clip_val=1",
               f"hydra.run.dir={run}")
    assert "Suggested learning rate: model.optimizer.lr=" in done.stdout
    assert (run / "lr_finder.png").is_file()
    assert not (run / "results.json").exists() and not list((run / "checkpoints").glob("epoch_*.ckpt"))


def test_a_run_cut_short_by_limit_batches_says_its_results_are_partial(make_cfg, tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    # debug=limit and fast_dev_run score a few batches of validation and test; nothing may pass that for the whole.
    train(make_cfg("train", ["trainer.max_epochs=2", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1",
                             "trainer.limit_test_batches=1", "callbacks.heatmap=null"]))
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert len(pd.read_parquet(run / "predictions.parquet")) == 32
    assert 0 < results["val/coverage"] < 1 and 0 < results["test/coverage"] < 1
    # Once per split, not at every epoch nor at the sanity check.
    assert caplog.text.count("Scored 32 of the") == 2
    assert caplog.text.count("val patches (1 batches") == caplog.text.count("test patches (1 batches") == 1
    # The checkpoint carries how much validation its operating point saw, for every later card (export, ensembles).
    point = read_checkpoint(next((run / "checkpoints").glob("epoch_*.ckpt"))).operating_point
    assert point.coverage == pytest.approx(results["val/coverage"])
    card = (run / "MODEL_CARD.md").read_text()
    assert f"only {results['test/coverage']:.1%} of the test patches" in card and "From " not in card
    assert f"on only {point.coverage:.1%} of their patches" in card


def test_test_fraction_zero_trains_on_every_patient_but_validation(make_cfg, tmp_path: Path) -> None:
    train(make_cfg("train", [*FAST, "data.test_fraction=0", "test=false", "callbacks.heatmap=null"]))
    splits = pd.read_csv(tmp_path / "run" / "splits.csv", dtype=str)
    assert set(splits.split) == {"train", "val"} and len(splits) == TINY["num_patients"]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    card = (tmp_path / "run" / "MODEL_CARD.md").read_text()
    assert NOT_TESTED in card and "n/a" not in card
    # A run that must test fails before training, not after it.
    with pytest.raises(SplitError, match="test_fraction=0 holds out no test patient"):
        train(make_cfg("train", [*FAST, "data.test_fraction=0"], output_dir=tmp_path / "tested"))
    assert not (tmp_path / "tested" / "checkpoints").exists()
    # The split it saved can be reused as it is, with the same promise not to test.
    saved = f"data.split_file={tmp_path / 'run' / 'splits.csv'}"
    train(make_cfg("train", [*FAST, saved, "test=false", "callbacks.heatmap=null"], output_dir=tmp_path / "again"))
    assert pd.read_csv(tmp_path / "again" / "splits.csv", dtype=str).equals(splits)
    with pytest.raises(SplitError, match="splits.csv has no test rows"):
        train(make_cfg("train", [*FAST, saved], output_dir=tmp_path / "tested_again"))


def test_small_data_recipe_trains_from_random_init(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("train", ["+experiment=small_data", "trainer.max_epochs=1", "trainer.limit_train_batches=3",
                             "callbacks.heatmap=null"])
    assert cfg.data.augment_on == "device" and not cfg.model.pretrained and cfg.callbacks.early_stopping is None
    assert cfg.callbacks.swa.start_epoch == 2
    train(cfg)
    checkpoint = next((tmp_path / "run" / "checkpoints").glob("epoch_*.ckpt"))
    state = torch.load(checkpoint, weights_only=True)
    assert {key: state["datamodule_hyper_parameters"][key] for key in ("augment_on", "sampler")} == {
        "augment_on": "device", "sampler": "patient"}
    # The operating point of maximum F1, chosen on validation (docs/results.md), travels in the checkpoint.
    assert read_checkpoint(checkpoint).operating_point.method == "f1"
    assert (tmp_path / "run" / "results.json").is_file()
