"""Learning-rate schedules that need the run's total step count, bound by the LightningModule."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(optimizer: Optimizer, total_steps: int, warmup_fraction: float = 0.05,
                  final_lr_fraction: float = 0.01, decay_fraction: float = 1.0) -> LambdaLR:
    """Linear warm-up (pretrained BatchNorm statistics survive the first large steps), then cosine decay to
    `final_lr_fraction` of the peak over the first `decay_fraction` of the steps, then that rate held: a constant
    learning rate for stochastic weight averaging to average along (Izmailov et al., 2018)."""
    if not 0.0 < decay_fraction <= 1.0 or not 0.0 <= warmup_fraction < decay_fraction:
        raise ValueError(f"model.scheduler needs 0 <= warmup_fraction < decay_fraction <= 1; got warmup_fraction="
                         f"{warmup_fraction}, decay_fraction={decay_fraction}")
    warmup = max(1, int(total_steps * warmup_fraction))
    decay_end = max(warmup + 1, int(total_steps * decay_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, decay_end - warmup))
        return final_lr_fraction + (1 - final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
