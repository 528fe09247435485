"""ResNet-18 backbone factory: ImageNet weights through torchvision's weights API, never a silent fall-back."""

from __future__ import annotations

from pathlib import Path
from urllib.error import URLError

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18


class PretrainedWeightsError(RuntimeError):
    """ImageNet weights were asked for but cannot be had (offline, air-gapped cluster, bad file)."""


def imagenet_checkpoint_path(weights: ResNet18_Weights = ResNet18_Weights.IMAGENET1K_V1) -> Path:
    """Where torchvision caches the weights file: $TORCH_HOME/hub/checkpoints/<name>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def load_imagenet_state_dict() -> dict[str, torch.Tensor]:
    weights = ResNet18_Weights.IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=False)
    except (URLError, OSError) as error:
        raise PretrainedWeightsError(
            f"Could not download the ImageNet ResNet-18 weights ({error}). Put {weights.url} at "
            f"{imagenet_checkpoint_path(weights)} (the TORCH_HOME cache), give a state-dict file with "
            f"model.pretrained=PATH, or train from scratch with model.pretrained=false."
        ) from error


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise PretrainedWeightsError(f"model.pretrained={path}: no such file; give a ResNet-18 state dict")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state)


def build_resnet18(pretrained: bool | str = True, adapt_stem: bool = False) -> nn.Module:
    """ResNet-18 without its classifier (fc = Identity, 512 features).

    adapt_stem keeps the pretrained 7x7 kernel but drops its stride and the max-pool, so a 50-px patch keeps
    a 50x50 map at layer1 and 7x7 at layer4, instead of 13x13 and 2x2.
    """
    model = resnet18(weights=None)
    if pretrained is True:
        model.load_state_dict(load_imagenet_state_dict())
    elif pretrained not in (False, None):
        state = load_state_dict_file(Path(str(pretrained)))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if [key for key in missing if not key.startswith("fc.")] or unexpected:
            raise PretrainedWeightsError(
                f"model.pretrained={pretrained} is not a ResNet-18 state dict "
                f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
            )
    if adapt_stem:
        model.conv1.stride = (1, 1)
        model.maxpool = nn.Identity()
    model.fc = nn.Identity()
    return model
