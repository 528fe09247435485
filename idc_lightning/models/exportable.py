"""The trained classifier as one self-contained network: uint8 RGB patches in, P(IDC) out.

Everything between a patch file and the probability that is per patch lives inside (scaling to [0, 1], resize,
ImageNet normalisation, TTA, temperature, the mean over an ensemble's members), so a viewer or a service needs no
Python preprocessing. Macenko stain normalisation is per patient (it estimates stains over all of a patient's
patches) and stays outside, as does the spatial context (model.context_sigma), which needs each patch's neighbours
on its slide.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from idc_lightning.models.classifier import IDCClassifier
from idc_lightning.models.ensemble import FoldEnsemble
from idc_lightning.preprocessing import Preprocessing
from idc_lightning.symmetry import dihedral


class _MemberProbability(nn.Module):
    """One trained classifier on normalised images: its network, temperature and TTA."""

    def __init__(self, model: IDCClassifier) -> None:
        super().__init__()
        self.backbone = model.backbone
        self.head = model.head
        self.tta = bool(model.hparams.tta)
        self.register_buffer("temperature", model.temperature.detach().clone())

    def _probability(self, images: torch.Tensor) -> torch.Tensor:
        return (self.head(self.backbone(images)) / self.temperature).softmax(dim=1)[:, 1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.tta:
            return self._probability(images)
        return torch.stack([self._probability(dihedral(images, k)) for k in range(8)]).mean(dim=0)


class ExportedClassifier(nn.Module):
    """uint8 [N, patch_size, patch_size, 3] RGB patches (edge patches padded with pad_value) -> float32 P(IDC) [N].

    A FoldEnsemble exports as the mean of its members' probabilities, as eval and predict compute it.
    """

    def __init__(self, model: IDCClassifier, preprocessing: Preprocessing) -> None:
        super().__init__()
        members = model.members if isinstance(model, FoldEnsemble) else [model]
        self.members = nn.ModuleList(_MemberProbability(member) for member in members)
        self.image_size = preprocessing.image_size
        self.patch_size = preprocessing.patch_size
        self.register_buffer("mean", torch.tensor(preprocessing.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(preprocessing.std).view(1, 3, 1, 1))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        images = patches.permute(0, 3, 1, 2).float() / 255.0
        if self.image_size != self.patch_size:
            size = (self.image_size, self.image_size)
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
        images = (images - self.mean) / self.std
        return torch.stack([member(images) for member in self.members]).mean(dim=0)
