"""EvaluateFoldEnsemble: a cross-validation multirun ends by testing its folds as one model.

The fold ensemble is the best model a cross-validation yields (docs/results.md), and the jobs already hold everything
it needs, so the sweep runs the documented `python -m idc_lightning.eval ckpt_path=<sweep folder>` itself, into
`<sweep>/ensemble/`, and adds its metrics to summary.md. A subprocess keeps the evaluation's Trainer, devices and
logging apart from the launcher's. Under a cluster launcher the launcher runs on a login node, so there the command
is only logged, for the user to run where the jobs ran.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from idc_lightning.callbacks.sweep_summary import ENSEMBLE_DIR, collect_jobs, varying_settings, write_summary

log = logging.getLogger(__name__)

# Overrides of the sweep that also hold for its evaluation: where files live, the hardware, the loader.
FORWARDED = ("paths", "trainer", "data.num_workers", "data.batch_size")
NOT_FORWARDED = ("paths.output_dir",)
# Launchers whose jobs run on this machine (Hydra's basic one, submitit_local, joblib): the sweep's own process
# can run the evaluation; any other may have sent the jobs to nodes this process cannot use.
LOCAL_LAUNCHERS = (
    "hydra._internal.core_plugins.basic_launcher.BasicLauncher",
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
    "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
)
# Set in the launcher's own process when its jobs trained with DDP; a child eval must start its own process group.
DDP_ENVIRONMENT = ("LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
LOG_TAIL_CHARS = 3000
# Characters Hydra's override grammar and a shell both read literally: such a path needs no quotes.
PLAIN_PATH = re.compile(r"[\w./-]+", re.ASCII)


def _is_forwarded(key: str) -> bool:
    return key not in NOT_FORWARDED and any(key == name or key.startswith(f"{name}.") for name in FORWARDED)


def forwarded_overrides(task_overrides: list[str]) -> list[str]:
    """The command line's overrides that eval shares with train; sweeps (a,b or range()) have no one value."""
    parsed = OverridesParser.create().parse_overrides(list(task_overrides))
    return [override.input_line for override in parsed
            if not override.is_sweep_override() and _is_forwarded(override.key_or_group)]


def quoted(value: Path | str) -> str:
    """A value Hydra's override grammar reads back verbatim, whatever characters a path holds; plain paths stay
    bare, so the command printed for a user reads as one they would type."""
    text = str(value)
    if PLAIN_PATH.fullmatch(text) and OverridesParser.create().parse_override(f"key={text}").value() == text:
        return text  # not one Hydra would read as a number, bool or null (42, 1e3, true, null)
    escaped = text.replace("'", "\\'")
    return f"'{escaped}'"


def ensemble_command(sweep_dir: Path, task_overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "idc_lightning.eval", f"ckpt_path={quoted(sweep_dir)}",
            f"hydra.run.dir={quoted(sweep_dir / ENSEMBLE_DIR)}", "extras.print_config=false",
            *forwarded_overrides(task_overrides)]


def runs_here(launcher_target: str) -> bool:
    """Whether a sweep's launcher ran its jobs on this machine, where its own process can test them."""
    return launcher_target in LOCAL_LAUNCHERS


def why_not_averaged(jobs: pd.DataFrame) -> str | None:
    """Why the sweep's jobs are not one model's folds, or None when they are."""
    varying = varying_settings(jobs)
    if varying:
        return f"the sweep varies {', '.join(varying)} besides the fold; average one setting's checkpoints instead"
    failed = jobs.loc[jobs["status"] != "completed", "job"].tolist() if len(jobs) else []
    if failed:
        return f"jobs {failed} did not complete; list the completed jobs' checkpoints instead"
    if len(jobs) < 2:
        return f"{len(jobs)} job(s), an ensemble needs 2"
    return None


class EvaluateFoldEnsemble(Callback):
    """Hydra callback (hydra.callbacks, set by +experiment=real_cv): after the last job, eval of the sweep folder.

    `timeout_minutes` bounds the evaluation, so a sweep always ends.
    """

    def __init__(self, timeout_minutes: float = 120.0) -> None:
        self.timeout_minutes = timeout_minutes

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        task_name = str(config.get("task_name", None) or config.hydra.job.name)
        command = ensemble_command(sweep_dir, list(config.hydra.overrides.task))
        printed = shlex.join(["python", *command[1:]])
        reason = why_not_averaged(collect_jobs(sweep_dir, task_name))
        if reason is None and not runs_here(config.hydra.launcher._target_):
            reason = "the jobs ran under a cluster launcher, and this process may be on a login node"
        if reason is not None:
            log.warning("Not testing the folds as one model here: %s. To test them: %s", reason, printed)
            return
        log.info("Testing the folds as one model: %s", printed)
        environment = {k: v for k, v in os.environ.items() if k not in DDP_ENVIRONMENT}
        try:
            done = subprocess.run(command, cwd=str(config.hydra.runtime.cwd), env=environment, capture_output=True,
                                  text=True, timeout=60 * self.timeout_minutes)
        except subprocess.TimeoutExpired:
            log.error("The folds' ensemble evaluation ran past %g minutes and was stopped; the jobs' results stand. "
                      "Run it yourself: %s", self.timeout_minutes, printed)
            return
        if done.returncode != 0:
            log.error("The folds' ensemble evaluation failed (exit %d); the jobs' results stand. Its output ends:\n%s",
                      done.returncode, (done.stdout + done.stderr)[-LOG_TAIL_CHARS:])
            return
        # Hydra ends callbacks in reverse order, so SweepSummary may already have written summary.md.
        write_summary(sweep_dir, task_name)
        log.info("The folds as one model: %s", sweep_dir / ENSEMBLE_DIR / "results.json")
