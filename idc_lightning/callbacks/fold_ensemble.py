"""EvaluateFoldEnsemble: a cross-validation multirun ends by testing its folds as one model.

The fold ensemble is the best model a cross-validation yields (docs/results.md), and the jobs already hold everything
it needs, so the sweep runs the documented `python -m idc_lightning.eval ckpt_path=<sweep folder>` itself, into
`<sweep>/ensemble/`, and adds its metrics to summary.md. A subprocess keeps the evaluation's Trainer, devices and
logging apart from the launcher's.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from idc_lightning.callbacks.sweep_summary import ENSEMBLE_DIR, collect_jobs, varying_settings, write_summary

log = logging.getLogger(__name__)

# Overrides of the sweep that also hold for its evaluation: where files live, and the hardware to run on.
FORWARDED_PREFIXES = ("paths.", "trainer.", "data.num_workers")
LOG_TAIL_CHARS = 3000


def forwarded_overrides(task_overrides: list[str]) -> list[str]:
    """The command line's overrides that eval shares with train; sweeps (a,b or range()) have no one value."""
    parsed = OverridesParser.create().parse_overrides(list(task_overrides))
    return [override.input_line for override in parsed if not override.is_sweep_override()
            and override.key_or_group.startswith(FORWARDED_PREFIXES)]


def ensemble_command(sweep_dir: Path, task_overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "idc_lightning.eval", f"ckpt_path={sweep_dir}",
            f"hydra.run.dir={sweep_dir / ENSEMBLE_DIR}", "extras.print_config=false",
            *forwarded_overrides(task_overrides)]


class EvaluateFoldEnsemble(Callback):
    """Hydra callback (hydra.callbacks, set by +experiment=real_cv): after the last job, eval of the sweep folder."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        jobs = collect_jobs(sweep_dir, str(config.get("task_name", "train")))
        completed = int((jobs["status"] == "completed").sum()) if len(jobs) else 0
        varying = varying_settings(jobs)
        if varying:
            log.warning("Not testing the folds as one model: the sweep varies %s besides the fold; run "
                        "python -m idc_lightning.eval 'ckpt_path=[...]' with one setting's checkpoints",
                        ", ".join(varying))
            return
        if completed < 2:
            log.warning("Not testing the folds as one model: %d job(s) completed, an ensemble needs 2", completed)
            return
        command = ensemble_command(sweep_dir, list(config.hydra.overrides.task))
        log.info("Testing the %d folds as one model: %s", completed, " ".join(command[1:]))
        done = subprocess.run(command, cwd=str(config.hydra.runtime.cwd), capture_output=True, text=True)
        if done.returncode != 0:
            log.error("The folds' ensemble evaluation failed (exit %d); the jobs' results stand. Its output ends:\n%s",
                      done.returncode, (done.stdout + done.stderr)[-LOG_TAIL_CHARS:])
            return
        write_summary(sweep_dir, str(config.get("task_name", "train")))
        log.info("The folds as one model: %s (and %s)", sweep_dir / ENSEMBLE_DIR / "results.json",
                 sweep_dir / "summary.md")
