"""Resume by run folder without training: the folder check, the kept W&B id, the saved config and overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from idc_lightning.resume import ResumeError, resumed_config, run_dir, wandb_run_id


def test_resume_needs_a_run_folder(tmp_path: Path) -> None:
    assert run_dir(None, "outputs/train/runs/now") == "outputs/train/runs/now"
    with pytest.raises(ResumeError, match=r"no \.hydra/config\.yaml there"):
        run_dir(str(tmp_path), "outputs/train/runs/now")


def test_wandb_run_id_is_created_once_per_run_folder(tmp_path: Path) -> None:
    first = wandb_run_id(str(tmp_path / "run"))
    assert wandb_run_id(str(tmp_path / "run")) == first and wandb_run_id(str(tmp_path / "other")) != first
    assert [path.name for path in (tmp_path / "run").iterdir()] == ["wandb_run_id.txt"]


def test_resumed_config_is_the_saved_one_with_this_launchs_key_overrides(make_cfg, tmp_path: Path) -> None:
    original = make_cfg("train", ["model.dropout=0.3"])
    saved = original.copy()
    with open_dict(saved):
        del saved["hydra"]
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(saved, run / ".hydra" / "config.yaml")
    OmegaConf.save(list(original.hydra.overrides.task), run / ".hydra" / "overrides.yaml")

    resumed = resumed_config(make_cfg("train", [f"resume={run}", "trainer.max_epochs=7"]))
    assert resumed.model.dropout == 0.3 and resumed.trainer.max_epochs == 7
    assert resumed.ckpt_path == "last" and resumed.resume == str(run)
    with pytest.raises(ResumeError, match="`data=kaggle` changes the config's structure"):
        resumed_config(make_cfg("train", [f"resume={run}", "data=kaggle"]))
