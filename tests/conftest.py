"""Shared fixtures: tiny generated slides once per test run, Hydra configs composed for tmp folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict, read_write

from idc_lightning.data.synthetic import SyntheticSlides
from idc_lightning.resolvers import register_resolvers

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
# The 25-patient real Kaggle sample: beside the developers' checkout, or wherever IDC_REAL_DATA points.
REAL_DATA = Path(os.environ.get("IDC_REAL_DATA", REPO.parent / "shared" / "data" / "idc_real"))
TINY = {"num_patients": 12, "seed": 0, "grid_min": 6, "grid_max": 8}

register_resolvers()
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """paths.data_dir holding the tiny synthetic set under the folder name data=synthetic expects."""
    data_dir = tmp_path_factory.mktemp("data")
    SyntheticSlides(**TINY).ensure(data_dir / f"synthetic_p{TINY['num_patients']}_s{TINY['seed']}")
    return data_dir


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not REAL_DATA.is_dir():
        pytest.skip(f"real IDC sample not found at {REAL_DATA} (only beside the developers' checkout; set "
                    "IDC_REAL_DATA to its folder elsewhere)")
    return REAL_DATA


def compose_config(config_name: str, output_dir: Path, data_dir: Path, overrides: list[str] = ()) -> DictConfig:
    """Compose like the CLI would, with hydra's runtime values set so ${hydra:...} resolves."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        # The tiny generated set, unless the test picks its own data (data=kaggle data.root=...); export has no
        # data or trainer, and only train has a model group (eval and predict take it from the checkpoint).
        # predict reads its input folder as it is (data=kaggle), so it never gets the generator.
        tiny = [] if config_name == "predict" or any(o.startswith("data=") for o in overrides) else [
            "data=synthetic", *(f"data.synthetic.{key}={value}" for key, value in TINY.items())]
        runs_data = ([*tiny, "data.num_workers=0", "data.batch_size=32", "trainer.accelerator=cpu"]
                     if config_name != "export" else [])
        base = [
            *runs_data,
            *(["model.pretrained=false"] if config_name == "train" else []),
            "extras.print_config=false",
            f"paths.data_dir={data_dir}",
            f"paths.cache_dir={data_dir}/cache",
            f"hydra.run.dir={output_dir}",
        ]
        cfg = compose(config_name=config_name, overrides=base + list(overrides), return_hydra_config=True)
    with read_write(cfg), open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture
def make_cfg(tiny_data_dir: Path, tmp_path: Path):
    """make_cfg("train", ["trainer.max_epochs=1"]) → a composed config writing into tmp_path/run."""

    def make(config_name: str = "train", overrides: list[str] = (), output_dir: Path | None = None) -> DictConfig:
        return compose_config(config_name, output_dir or tmp_path / "run", tiny_data_dir, list(overrides))

    return make


@pytest.fixture(scope="session")
def trained_checkpoint(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint written by a real (two-batch) training run on the tiny set: self-describing, as users get."""
    from idc_lightning.train import train

    run = tmp_path_factory.mktemp("trained")
    train(compose_config("train", run, tiny_data_dir, ["trainer.max_epochs=1", "trainer.limit_train_batches=2",
                                                       "callbacks.heatmap=null", "test=false"]))
    return next((run / "checkpoints").glob("epoch_*.ckpt"))

