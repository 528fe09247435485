"""callbacks=[default,ema]: the averaged weights are validated, saved and tested; the model's own buffers are not
averaged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from idc_lightning.eval import evaluate
from idc_lightning.train import train

EMA_RUN = ["callbacks=[default,ema]", "callbacks.ema.decay=0.5", "callbacks.heatmap=null",
           "callbacks.early_stopping=null", "model.calibrate=temperature", "trainer.max_epochs=2",
           "trainer.limit_train_batches=3"]


def test_checkpoint_holds_the_average_with_the_models_own_buffers(make_cfg, tmp_path: Path) -> None:
    train(make_cfg("train", EMA_RUN))
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    averaged, current = state["state_dict"], state["current_model_state"]
    conv = "backbone.conv1.weight"
    assert not torch.equal(averaged[conv], current[conv])
    # The temperature is refitted at every validation: copied from the trained model, never averaged.
    assert float(current["temperature"]) != 1.0
    assert torch.equal(averaged["temperature"], current["temperature"])
    # The patches tested after training are scored by the averaged weights that eval loads from the best checkpoint.
    best = next((tmp_path / "run" / "checkpoints").glob("epoch_*.ckpt"))
    evaluate(make_cfg("eval", [f"ckpt_path={best}"], output_dir=tmp_path / "eval"))
    keys = ["patient_id", "x", "y"]
    trained = pd.read_parquet(tmp_path / "run" / "predictions.parquet").sort_values(keys)
    evaluated = pd.read_parquet(tmp_path / "eval" / "predictions.parquet").sort_values(keys)
    assert np.allclose(trained["prob"].to_numpy(), evaluated["prob"].to_numpy(), atol=1e-6)
