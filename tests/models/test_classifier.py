from __future__ import annotations

from functools import partial
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
from torchvision.models import resnet18

import idc_lightning.models.backbone as backbone
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


def test_separate_learning_rates_and_frozen_backbone() -> None:
    model = classifier(backbone_lr_scale=0.1, freeze_backbone_epochs=1)
    optimizer = model.configure_optimizers()["optimizer"]
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([1e-4, 1e-3])
    model.on_train_epoch_start()
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
