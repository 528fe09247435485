"""Resume by run folder: `resume=<run folder>` reruns that run in place, from its saved config and last.ckpt.

Hydra writes a launch's config into `<run>/<hydra.output_subdir>` before the task starts, so a resumed launch
writes into `.hydra/resumed` and the run's own `.hydra/config.yaml` stays the record of what was trained.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

SAVED_CONFIG = Path(".hydra") / "config.yaml"
RESUMED_SUBDIR = ".hydra/resumed"
WANDB_ID_FILE = "wandb_run_id.txt"


class ResumeError(ValueError):
    """A `resume=` folder or override that cannot continue a run."""


def run_dir(resume: str | None, new_run_dir: str) -> str:
    """hydra.run.dir: the folder to resume, checked before Hydra writes into it, else a new timestamped one."""
    if resume is None:
        return new_run_dir
    if not (Path(resume) / SAVED_CONFIG).is_file():
        raise ResumeError(f"resume={resume}: no {SAVED_CONFIG} there; give a run folder such as "
                          "outputs/train/runs/<time> (it holds .hydra/ and checkpoints/)")
    return str(resume)


def hydra_subdir(resume: str | None) -> str:
    """hydra.output_subdir: keep the resumed run's own .hydra/config.yaml, which train() reloads."""
    return ".hydra" if resume is None else RESUMED_SUBDIR


def wandb_run_id(output_dir: str) -> str:
    """The run folder's W&B id, created once: resumed and requeued launches log to the same W&B run."""
    path = Path(output_dir) / WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Ranks of a multi-node job resolve this at once: write aside, then link, so exactly one id wins.
    draft = path.with_name(f"{WANDB_ID_FILE}.{os.getpid()}")
    draft.write_text(uuid.uuid4().hex[:8])
    try:
        os.link(draft, path)
    except FileExistsError:
        pass
    finally:
        draft.unlink()
    return path.read_text().strip()


def resumed_config(cfg: DictConfig) -> DictConfig:
    """The run's saved config with this launch's own key=value overrides on top, resuming from last.ckpt.

    Overrides the run was launched with are repeated harmlessly; a different config group choice is refused,
    since the checkpoint was trained with the saved one.
    """
    folder = Path(cfg.resume)
    saved = OmegaConf.load(folder / SAVED_CONFIG)
    original = set(OmegaConf.load(folder / ".hydra" / "overrides.yaml"))
    choices = HydraConfig.get().runtime.choices
    for override in OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task)):
        text = override.input_line
        if override.key_or_group == "resume" or text in original:
            continue
        if override.key_or_group in choices or override.is_delete():
            raise ResumeError(f"resume={folder}: `{text}` changes the config's structure; a resumed run keeps "
                              f"{folder / SAVED_CONFIG}. Start a new run for it, or override single keys")
        OmegaConf.update(saved, override.key_or_group, override.value(), force_add=override.is_add())
    with open_dict(saved):
        saved.resume = str(folder)
        saved.ckpt_path = "last"
    return saved
