"""FoldEnsemble: the mean IDC probability of several trained classifiers, such as the folds of `+experiment=real_cv`.

Each fold model was validated on other patients, so the average of their probabilities varies less from patient to
patient than any one of them (docs/results.md: on the real sample it beats the average fold on test AUROC, F1 and
balanced accuracy). Everything after the probability (spatial context, operating point, metrics, reports) is
IDCClassifier's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from idc_lightning.evaluation.operating_point import OperatingPoint
from idc_lightning.models.classifier import IDCClassifier

# Hyper-parameters applied after the members' probabilities are averaged: the members must agree on them.
SHARED_AFTER_AVERAGING = ("context_sigma", "threshold")


class FoldEnsemble(IDCClassifier):
    """Evaluation and prediction only: P(IDC) is the mean of the members' (each with its own TTA and temperature),
    called IDC at `operating_point`."""

    def __init__(self, members: Sequence[IDCClassifier], operating_point: OperatingPoint) -> None:
        if not members:
            raise ValueError("FoldEnsemble needs at least one member")
        first = dict(members[0].hparams)
        for member in members[1:]:
            differing = [key for key in SHARED_AFTER_AVERAGING if member.hparams[key] != first[key]]
            if differing:
                raise ValueError(f"the models of an ensemble differ in model.{', model.'.join(differing)} "
                                 f"({[{k: m.hparams[k] for k in differing} for m in members]}): these apply to the "
                                 "averaged probability, so they must agree")
        super().__init__(**{**first, "pretrained": False})
        # The base class saved every __init__ argument in the hierarchy; the members are modules, not settings.
        self.save_hyperparameters(ignore=["members", "operating_point"])
        # The members are the network: the ResNet-18 the base class built is dropped, not used.
        del self.backbone, self.head
        self.members = nn.ModuleList(members)
        # test/loss weighs the classes as the members' training did (their splits' frequencies differ a little).
        self.loss_weights.copy_(torch.stack([member.loss_weights for member in members]).mean(dim=0))
        self.operating_point = operating_point

    def configure_optimizers(self) -> dict:
        raise TypeError("FoldEnsemble is for eval and predict; train each member (a fold) with idc_lightning.train")

    def configure_model(self) -> None:
        for member in self.members:
            member.configure_model()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Log-odds of the ensemble probability as two logits (0, log p/(1-p)), so softmax gives it back."""
        probs = self.idc_probability(images).clamp(1e-7, 1 - 1e-7)
        return torch.stack([torch.zeros_like(probs), torch.log(probs) - torch.log1p(-probs)], dim=1)

    def idc_probability(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([member.idc_probability(images) for member in self.members]).mean(dim=0)
