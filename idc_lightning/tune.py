"""`tune=lr`: Lightning's learning-rate finder on the configured model and data, in place of fit and test."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib.pyplot as plt
from lightning.pytorch.tuner import Tuner
from omegaconf import DictConfig

from idc_lightning.builders import Run

log = logging.getLogger(__name__)


def find_lr(run: Run, settings: DictConfig, output_dir: Path) -> dict[str, float]:
    """Sweep the lr over a short fit, save the loss curve, return the suggestion as `tune/lr`.

    update_attr=False: the model keeps its lr in the optimizer partial (model.optimizer.lr), not an `lr`
    attribute, and the finder's result is advice for the next run's config rather than a change to this one.
    The finder sets one lr for every parameter group, so model.backbone_lr_scale plays no part in it.
    """
    finder = Tuner(run.trainer).lr_find(run.model, datamodule=run.datamodule, update_attr=False, **settings)
    if finder is None or not run.trainer.is_global_zero:  # None under fast_dev_run
        return {}
    suggestion = finder.suggestion()
    if suggestion is None:
        log.warning("The lr finder found no suggestion (too few steps or a flat loss): see %s",
                    output_dir / "lr_finder.png")
    figure = finder.plot(suggest=suggestion is not None)
    figure.savefig(output_dir / "lr_finder.png", dpi=120)
    plt.close(figure)
    if suggestion is None:
        return {}
    print(f"Suggested learning rate: model.optimizer.lr={suggestion:.3g} (curve: {output_dir / 'lr_finder.png'})")
    return {"tune/lr": float(suggestion)}
