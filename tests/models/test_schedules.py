from __future__ import annotations

import pytest
import torch

from idc_lightning.models.schedules import warmup_cosine


def learning_rates(total_steps: int, **kwargs) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = warmup_cosine(optimizer, total_steps, **kwargs)
    rates = []
    for _ in range(total_steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_warm_up_then_cosine_to_the_final_fraction_at_the_last_step() -> None:
    rates = learning_rates(100, warmup_fraction=0.1, final_lr_fraction=0.01)
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:], strict=False))
    assert rates[-1] == pytest.approx(0.01, abs=1e-3)


def test_decay_fraction_holds_the_final_rate_for_weight_averaging() -> None:
    rates = learning_rates(100, warmup_fraction=0.05, final_lr_fraction=0.25, decay_fraction=0.4)
    assert rates[20] > 0.5 and rates[39] > 0.25
    assert rates[40:] == pytest.approx([0.25] * 60)
    assert learning_rates(3, warmup_fraction=0.05, final_lr_fraction=0.25, decay_fraction=0.4) == pytest.approx(
        [1.0, 1.0, 0.25])
    with pytest.raises(ValueError, match="decay_fraction=0.0"):
        learning_rates(10, decay_fraction=0.0)
    with pytest.raises(ValueError, match="warmup_fraction=0.5"):
        learning_rates(10, warmup_fraction=0.5, decay_fraction=0.4)
