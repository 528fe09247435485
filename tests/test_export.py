"""Export: the calibrated model with its preprocessing inside, checked against PyTorch; the run's model card."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REAL_DATA, REPO, compose_config

from idc_lightning.checkpoints import read_checkpoint
from idc_lightning.data.augment_config import AugmentConfig
from idc_lightning.data.cache import decode_patch
from idc_lightning.data.device_augment import BatchAugment
from idc_lightning.export import export, run_onnx
from idc_lightning.models.exportable import ExportedClassifier
from idc_lightning.train import train


@pytest.fixture(scope="module")
def calibrated_run(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, float]]:
    run = tmp_path_factory.mktemp("calibrated")
    overrides = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "callbacks.heatmap=null",
                 "data.image_size=64", "model.calibrate=temperature"]
    return run, train(compose_config("train", run, tiny_data_dir, overrides))


def _patches(tiny_data_dir: Path, count: int = 24) -> np.ndarray:
    """Real Kaggle patches when the sample is beside the checkout, else generated ones."""
    root = REAL_DATA if REAL_DATA.is_dir() else tiny_data_dir
    files = sorted(root.rglob("*_class1.png"))[:count // 2] + sorted(root.rglob("*_class0.png"))[:count // 2]
    return np.stack([decode_patch(path) for path in files])


def test_temperature_is_fitted_saved_and_reported(calibrated_run) -> None:
    run, metrics = calibrated_run
    checkpoint = read_checkpoint(next((run / "checkpoints").glob("epoch_*.ckpt")))
    assert checkpoint.hyper_parameters["calibrate"] == "temperature"
    assert float(checkpoint.state["temperature"]) != 1.0
    assert 0.0 <= metrics["test/ece"] <= 1.0 and metrics["test/collapsed"] == 0.0
    assert (run / "reliability_diagram.png").stat().st_size > 0
    card = (run / "MODEL_CARD.md").read_text()
    assert f"threshold {checkpoint.operating_point.threshold:.4f}" in card and "temperature" in card
    assert "4 µm/px" in card and f"{len(checkpoint.patients['test'])} test" in card


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_matches_the_pytorch_model_on_patches(fmt: str, calibrated_run, tiny_data_dir: Path,
                                                     tmp_path: Path) -> None:
    run, _ = calibrated_run
    ckpt = next((run / "checkpoints").glob("epoch_*.ckpt"))
    path = export(compose_config("export", tmp_path, tiny_data_dir, [f"ckpt_path={ckpt}", f"format={fmt}"]))
    assert (tmp_path / "MODEL_CARD.md").is_file()
    patches = _patches(tiny_data_dir)
    checkpoint = read_checkpoint(ckpt)
    model, pre = checkpoint.model(), checkpoint.preprocessing
    # The path eval and predict take: normalisation as in the loaders, then the model with its temperature.
    normalise = BatchAugment(AugmentConfig(), pre.image_size, pre.mean, pre.std)
    with torch.no_grad():
        expected = model.idc_probability(normalise(torch.from_numpy(patches), train=False)).numpy()
        module = ExportedClassifier(model, pre).eval()
        np.testing.assert_allclose(module(torch.from_numpy(patches)).numpy(), expected, atol=1e-5)
    for batch in (patches, patches[:1]):  # the batch dimension is dynamic
        if fmt == "onnx":
            exported = run_onnx(path, batch)
        else:
            with torch.no_grad():
                exported = torch.jit.load(str(path))(torch.from_numpy(batch)).numpy()
        assert np.abs(exported - expected[: len(batch)]).max() <= 1e-4


def test_collapsed_probabilities_are_said_and_flagged(caplog: pytest.LogCaptureFixture, calibrated_run) -> None:
    run, _ = calibrated_run
    model = read_checkpoint(next((run / "checkpoints").glob("epoch_*.ckpt"))).model()
    with caplog.at_level(logging.WARNING):
        assert model._warn_if_collapsed("test", np.full(50, 0.9999)) == 1.0
        assert model._warn_if_collapsed("test", np.linspace(0.1, 0.9, 50)) == 0.0
    assert "test probabilities collapsed to one value (0.9999 for all 50 patches)" in caplog.text


def test_short_epochs_are_warned_about(make_cfg, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        train(make_cfg("train", ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "test=false",
                                 "callbacks.heatmap=null"]))
    assert "Only 2 optimizer steps per epoch" in caplog.text and "Lower data.batch_size" in caplog.text


@pytest.mark.slow
def test_export_cli(calibrated_run, tmp_path: Path) -> None:
    run, _ = calibrated_run
    ckpt = next((run / "checkpoints").glob("epoch_*.ckpt"))
    command = [sys.executable, "-m", "idc_lightning.export", f"ckpt_path={ckpt}", "extras.print_config=false",
               f"hydra.run.dir={tmp_path / 'export'}"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "export" / "model.onnx").stat().st_size > 1_000_000
    assert "max |difference| to the PyTorch model" in done.stderr + done.stdout
    assert "## Test results (held-out patients)" in (tmp_path / "export" / "MODEL_CARD.md").read_text()
