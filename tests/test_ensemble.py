"""Fold ensembles: eval, predict and export take a sweep folder or a list of checkpoints and average the models."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import compose_config

from idc_lightning.checkpoints import CheckpointError, EnsembleCheckpoint, read_checkpoint, read_model_checkpoint
from idc_lightning.eval import evaluate
from idc_lightning.evaluation.metrics import ranking_metrics
from idc_lightning.evaluation.spatial_context import smooth_patient_probabilities
from idc_lightning.export import export, run_onnx
from idc_lightning.model_card import NOT_TESTED
from idc_lightning.models.ensemble import FoldEnsemble
from idc_lightning.models.exportable import ExportedClassifier
from idc_lightning.predict import predict
from idc_lightning.train import train

FOLDS = 2


@pytest.fixture(scope="module")
def sweep(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cross-validation sweep folder as Hydra writes it: <sweep>/<job>/checkpoints/epoch_*.ckpt, one per fold."""
    folder = tmp_path_factory.mktemp("sweep")
    for fold in range(FOLDS):
        train(compose_config("train", folder / str(fold), tiny_data_dir, [
            "trainer.max_epochs=1", "trainer.limit_train_batches=2", "callbacks.heatmap=null", "test=false",
            "data.num_folds=3", f"data.fold={fold}"]))
    return folder


def members(sweep: Path) -> list[Path]:
    return sorted(sweep.glob("*/checkpoints/epoch_*.ckpt"))


def test_a_sweep_folder_is_read_as_the_ensemble_of_its_folds(sweep: Path) -> None:
    ensemble = read_model_checkpoint(sweep)
    folds = [read_checkpoint(path) for path in members(sweep)]
    assert isinstance(ensemble, EnsembleCheckpoint) and len(ensemble.members) == FOLDS
    assert ensemble.operating_point.threshold == pytest.approx(np.mean([f.operating_point.threshold for f in folds]))
    # The folds validated on different patients; every one of them was seen by some member.
    assert not set(folds[0].patients["val"]) & set(folds[1].patients["val"])
    assert ensemble.patients["val"] == sorted({*folds[0].patients["val"], *folds[1].patients["val"]})
    assert set(ensemble.seen_patients) == {p for fold in folds for p in fold.seen_patients}
    assert ensemble.patients["test"] == sorted(folds[0].patients["test"])
    assert isinstance(read_model_checkpoint(sweep / "0"), type(folds[0]))  # one run folder: its best checkpoint


def test_the_ensemble_probability_is_the_members_mean(sweep: Path) -> None:
    model = read_model_checkpoint([str(path) for path in members(sweep)]).model()
    assert isinstance(model, FoldEnsemble) and "members" not in model.hparams
    images = torch.randn(6, 3, 50, 50)
    with torch.no_grad():
        expected = torch.stack([read_checkpoint(p).model().idc_probability(images) for p in members(sweep)]).mean(0)
        assert torch.allclose(model.idc_probability(images), expected, atol=1e-6)
        assert torch.allclose(model(images).softmax(dim=1)[:, 1], expected, atol=1e-5)


def test_eval_of_a_sweep_tests_the_averaged_model_on_patients_no_fold_saw(make_cfg, sweep: Path,
                                                                          tmp_path: Path) -> None:
    metrics = evaluate(make_cfg("eval", [f"ckpt_path={sweep}"], output_dir=tmp_path / "ensemble"))
    tested = pd.read_parquet(tmp_path / "ensemble" / "predictions.parquet")
    assert not set(tested.patient_id) & set(read_model_checkpoint(sweep).seen_patients)
    keys = ["patient_id", "x", "y"]
    alone = []
    for number, path in enumerate(members(sweep)):
        # Each fold saw every patient outside the test split, so it is tested on the same patients.
        evaluate(make_cfg("eval", [f"ckpt_path={path}"], output_dir=tmp_path / f"fold{number}"))
        alone.append(pd.read_parquet(tmp_path / f"fold{number}" / "predictions.parquet").sort_values(keys))
    tested = tested.sort_values(keys)
    mean = np.mean([frame["patch_prob"].to_numpy() for frame in alone], axis=0)
    assert tested["patch_prob"].to_numpy() == pytest.approx(mean, abs=1e-5)
    sigma = read_model_checkpoint(sweep).hyper_parameters["context_sigma"]
    in_context = smooth_patient_probabilities(tested.assign(patch_prob=mean), sigma)
    assert metrics["test/auroc"] == pytest.approx(ranking_metrics(in_context, tested["label"])["auroc"], abs=1e-5)
    assert metrics["test/val_threshold"] == pytest.approx(read_model_checkpoint(sweep).operating_point.threshold)


def test_predict_takes_a_list_of_checkpoints(tiny_data_dir: Path, sweep: Path, tmp_path: Path) -> None:
    patient = sorted(p for p in next(tiny_data_dir.glob("synthetic_*")).iterdir() if p.is_dir())[0]
    listed = "[" + ",".join(str(path) for path in members(sweep)) + "]"
    predictions = predict(compose_config("predict", tmp_path / "ensemble", tiny_data_dir,
                                         [f"ckpt_path={listed}", f"input={patient}"]))
    each = [predict(compose_config("predict", tmp_path / str(n), tiny_data_dir, [f"ckpt_path={p}", f"input={patient}"]))
            for n, p in enumerate(members(sweep))]
    mean = np.mean([frame["patch_prob"].to_numpy() for frame in each], axis=0)
    assert predictions["patch_prob"].to_numpy() == pytest.approx(mean, abs=1e-5)


def test_a_job_without_a_checkpoint_is_named_and_left_out(sweep: Path, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """Job 1's best checkpoint has a name of the user's (callbacks.model_checkpoint.filename); job 2 has only the
    resume point, last.ckpt, which is no best checkpoint."""
    for job in ("0", "1", "2"):  # job folders as Hydra writes them
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(f"- data.fold={job}\n")
        (tmp_path / job / "checkpoints").mkdir()
    for job, name in (("0", "epoch_000.ckpt"), ("1", "fold1-auroc=0.93.ckpt"), ("2", "last.ckpt")):
        (tmp_path / job / "checkpoints" / name).write_bytes(members(sweep)[int(job) % 2].read_bytes())
    with caplog.at_level("WARNING"):
        ensemble = read_model_checkpoint(tmp_path)
    assert len(ensemble.members) == 2 and "jobs ['2'] have no best checkpoint" in caplog.text


def test_unusable_ensembles_fail_with_clear_errors(sweep: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="folder without a best checkpoint"):
        read_model_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="names no checkpoint"):
        read_model_checkpoint([])
    crowded = tmp_path / "crowded" / "checkpoints"
    crowded.mkdir(parents=True)
    for name in ("epoch_000.ckpt", "epoch_001.ckpt"):
        (crowded / name).write_bytes(members(sweep)[0].read_bytes())
    with pytest.raises(CheckpointError, match="more than one best checkpoint"):
        read_model_checkpoint(tmp_path / "crowded")
    state = torch.load(members(sweep)[1], weights_only=True)
    state["hyper_parameters"]["context_sigma"] = 0.0
    torch.save(state, tmp_path / "other_context.ckpt")
    with pytest.raises(ValueError, match="differ in model.context_sigma"):
        read_model_checkpoint([str(members(sweep)[0]), str(tmp_path / "other_context.ckpt")]).model()
    state["hyper_parameters"]["context_sigma"] = read_checkpoint(members(sweep)[0]).hyper_parameters["context_sigma"]
    state["IDCDataModule"]["preprocessing"]["pad_value"] += 1
    torch.save(state, tmp_path / "other_padding.ckpt")
    with pytest.raises(CheckpointError, match="different preprocessing \\(pad_value"):
        read_model_checkpoint([str(members(sweep)[0]), str(tmp_path / "other_padding.ckpt")])
    with pytest.raises(TypeError, match="for eval and predict"):
        read_model_checkpoint(sweep).model().configure_optimizers()


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_a_sweep_exports_as_one_network_giving_the_mean(fmt: str, make_cfg, sweep: Path, tmp_path: Path) -> None:
    path = export(make_cfg("export", [f"ckpt_path={sweep}", f"format={fmt}"], output_dir=tmp_path / "export"))
    patches = np.random.default_rng(0).integers(0, 256, size=(5, 50, 50, 3), dtype=np.uint8)
    with torch.no_grad():
        alone = [ExportedClassifier(read_checkpoint(p).model(), read_checkpoint(p).preprocessing).eval()
                 for p in members(sweep)]
        expected = torch.stack([module(torch.from_numpy(patches)) for module in alone]).mean(0).numpy()
        exported = (run_onnx(path, patches) if fmt == "onnx"
                    else torch.jit.load(str(path))(torch.from_numpy(patches)).numpy())
    assert np.abs(exported - expected).max() <= 1e-4
    card = (tmp_path / "export" / "MODEL_CARD.md").read_text()
    assert f"The mean probability of {FOLDS} checkpoints" in card and "0/checkpoints/epoch_" in card
    assert NOT_TESTED in card and "Calibration: none." in card


def test_the_ensemble_card_reports_the_sweeps_ensemble_results(make_cfg, sweep: Path, tmp_path: Path) -> None:
    # As +experiment=real_cv leaves it: the folds' eval run in <sweep>/ensemble.
    tested = shutil.copytree(sweep, tmp_path / "sweep")
    metrics = evaluate(make_cfg("eval", [f"ckpt_path={tested}"], output_dir=tested / "ensemble"))
    export(make_cfg("export", [f"ckpt_path={tested}", "format=torchscript"], output_dir=tmp_path / "export"))
    card = (tmp_path / "export" / "MODEL_CARD.md").read_text()
    assert f"| AUROC (patches) | {metrics['test/auroc']:.3f} |" in card and NOT_TESTED not in card
    # The same results given by hand, for a list of checkpoints.
    listed = f"ckpt_path=[{','.join(str(p) for p in members(tested))}]"
    export(make_cfg("export", [listed, f"results={tested / 'ensemble' / 'results.json'}", "format=torchscript"],
                    output_dir=tmp_path / "listed"))
    assert f"| AUROC (patches) | {metrics['test/auroc']:.3f} |" in (tmp_path / "listed" / "MODEL_CARD.md").read_text()
    with pytest.raises(FileNotFoundError, match="results=.*no such file"):
        export(make_cfg("export", [listed, f"results={tmp_path / 'missing.json'}"], output_dir=tmp_path / "again"))
