from __future__ import annotations

import subprocess
import sys
from functools import partial
from pathlib import Path
from urllib.error import URLError

import lightning as L
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from torchvision.models import resnet18

import idc_lightning.models.backbone as backbone
from idc_lightning.evaluation.operating_point import OperatingPoint, choose_threshold
from idc_lightning.evaluation.spatial_context import smooth_patient_probabilities
from idc_lightning.models.backbone import PretrainedWeightsError, build_resnet18, imagenet_checkpoint_path
from idc_lightning.models.classifier import IDCClassifier
from idc_lightning.symmetry import dihedral


def classifier(**kwargs) -> IDCClassifier:
    return IDCClassifier(optimizer=partial(torch.optim.AdamW, lr=1e-3), pretrained=False, **kwargs)


def test_two_logits_for_a_batch_of_50px_patches() -> None:
    model = classifier().eval()
    assert model(torch.randn(4, 3, 50, 50)).shape == (4, 2)
    probs = model.idc_probability(torch.randn(4, 3, 50, 50))
    assert probs.shape == (4,) and bool(((probs >= 0) & (probs <= 1)).all())


def test_tta_is_the_mean_over_the_eight_dihedral_views() -> None:
    torch.manual_seed(0)
    model = classifier(tta=True).eval()
    images = torch.randn(3, 3, 50, 50)
    expected = torch.stack([model(dihedral(images, k)).softmax(1)[:, 1] for k in range(8)]).mean(0)
    assert torch.allclose(model.idc_probability(images), expected)


def test_imagenet_weights_come_from_the_torch_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = resnet18(weights=None)
    path = imagenet_checkpoint_path()
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    model = build_resnet18(pretrained=True)
    assert torch.equal(model.conv1.weight, reference.conv1.weight)


def test_offline_without_weights_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(backbone.ResNet18_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline)
    with pytest.raises(PretrainedWeightsError) as error:
        build_resnet18(pretrained=True)
    message = str(error.value)
    assert str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in message
    assert "model.pretrained=false" in message


def test_state_dict_file_and_adapted_stem(tmp_path: Path) -> None:
    reference = resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    model = build_resnet18(pretrained=str(tmp_path / "r18.pth"), adapt_stem=True)
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert model.conv1.stride == (1, 1) and isinstance(model.maxpool, torch.nn.Identity)
    assert model(torch.randn(1, 3, 50, 50)).shape == (1, 512)
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(PretrainedWeightsError, match="not a ResNet-18 state dict"):
        build_resnet18(pretrained=str(tmp_path / "other.pth"))


def test_separate_learning_rates() -> None:
    model = classifier(backbone_lr_scale=0.1)
    optimizer = model.configure_optimizers()["optimizer"]
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([1e-4, 1e-3])


def test_frozen_backbone_keeps_weights_and_batchnorm_statistics(make_cfg) -> None:
    """One frozen epoch: every backbone tensor (weights and BatchNorm running statistics) is unchanged, the head
    learned. Nothing toggles requires_grad, so the same holds under DDP (tests/test_sweeps.py runs it there)."""
    cfg = make_cfg("train", ["trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1",
                             "model.freeze_backbone_epochs=1"])
    model, datamodule = instantiate(cfg.model), instantiate(cfg.data)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=3, limit_val_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=datamodule)
    after = model.state_dict()
    backbone = [k for k in before if k.startswith("backbone.")]
    assert any("running_mean" in k for k in backbone)
    assert all(torch.equal(before[k], after[k]) for k in backbone)
    assert not torch.equal(before["head.1.weight"], after["head.1.weight"])
    assert all(p.requires_grad for p in model.parameters())


def test_load_from_checkpoint_needs_no_argument_and_downloads_nothing(trained_checkpoint: Path, tmp_path: Path) -> None:
    """In a fresh Python, with ImageNet downloads made to fail: the checkpoint alone rebuilds the model."""
    script = f"""
import torchvision.models
def no_download(*args, **kwargs):
    raise RuntimeError("tried to download ImageNet weights")
torchvision.models.ResNet18_Weights.IMAGENET1K_V1.__class__.get_state_dict = no_download
import torch
from idc_lightning.models.classifier import IDCClassifier
model = IDCClassifier.load_from_checkpoint({str(trained_checkpoint)!r}, map_location="cpu").eval()
saved = torch.load({str(trained_checkpoint)!r}, map_location="cpu", weights_only=True)
assert model.operating_point.chosen_on == "val", model.operating_point
assert model.operating_point.threshold == saved["idc_lightning"]["operating_point"]["threshold"]
assert all(torch.equal(v, saved["state_dict"][k]) for k, v in model.state_dict().items())
print("ok", model(torch.zeros(2, 3, 50, 50)).shape)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ok torch.Size([2, 2])" in done.stdout


def test_label_smoothing_softens_the_training_targets_only() -> None:
    torch.manual_seed(0)
    images, labels = torch.randn(8, 3, 50, 50), torch.tensor([0, 1] * 4)
    # eval(): dropout off, so both models compute the same logits.
    hard, smoothed = classifier().eval(), classifier(label_smoothing=0.2).eval()
    smoothed.load_state_dict(hard.state_dict())
    batch = {"image": images, "label": labels}
    with torch.no_grad():
        logits = hard(images)
        expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.2)
        assert float(smoothed.training_step(batch, 0)) == pytest.approx(float(expected), rel=1e-5)
        assert float(hard.training_step(batch, 0)) != pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(ValueError, match="label_smoothing"):
        classifier(label_smoothing=1.0)


def test_mixup_blends_two_patches_and_their_weighted_losses() -> None:
    torch.manual_seed(0)
    images, labels = torch.randn(8, 3, 50, 50), torch.tensor([0, 1] * 4)
    model = classifier(mixup_alpha=0.4).eval()
    model.loss_weights.copy_(torch.tensor([1.0, 3.0]))
    with torch.no_grad():
        torch.manual_seed(1)
        weight = float(torch.distributions.Beta(0.4, 0.4).sample())
        partner = torch.randperm(8)
        logits = model(weight * images + (1 - weight) * images[partner])
        ce = partial(torch.nn.functional.cross_entropy, logits, weight=model.loss_weights)
        expected = weight * ce(labels) + (1 - weight) * ce(labels[partner])
        torch.manual_seed(1)
        assert float(model.training_step({"image": images, "label": labels}, 0)) == pytest.approx(float(expected))
        assert 0 < weight < 1 and not torch.equal(partner, torch.arange(8))
    with pytest.raises(ValueError, match="mixup_alpha"):
        classifier(mixup_alpha=-0.1)


def test_the_operating_point_is_chosen_on_probabilities_in_context(make_cfg) -> None:
    cfg = make_cfg("train", ["model.context_sigma=1.5", "model.threshold_method=f1"])
    model, datamodule = instantiate(cfg.model), instantiate(cfg.data)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=datamodule)
    val = model.predictions["val"]
    assert val["prob"].to_numpy() == pytest.approx(smooth_patient_probabilities(val, 1.5), abs=1e-6)
    assert not np.allclose(val["prob"], val["patch_prob"])
    chosen = choose_threshold(val["prob"].to_numpy(), val["label"].to_numpy(), "f1")
    assert model.operating_point.threshold == pytest.approx(chosen)
    assert chosen != pytest.approx(choose_threshold(val["patch_prob"].to_numpy(), val["label"].to_numpy(), "f1"))


def test_the_sanity_check_chooses_no_operating_point(make_cfg) -> None:
    # Lightning's sanity check scores a batch or two before training, often of one patient and one class.
    cfg = make_cfg("train")
    model, datamodule = instantiate(cfg.model), instantiate(cfg.data)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=0, num_sanity_val_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=datamodule)
    assert "val" in model.predictions
    assert model.operating_point == OperatingPoint(threshold=model.fixed_threshold)
