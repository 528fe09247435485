"""Multiruns through the real CLI (sweep summary, Optuna, W&B offline, DDP on CPU, kill and resume) and the
summary table functions."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import REPO, TINY, compose_config
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from torchvision.models import resnet18

from idc_lightning.callbacks.fold_ensemble_eval import forwarded_overrides, quoted, runs_here, why_not_averaged
from idc_lightning.callbacks.sweep_summary import (
    collect_jobs,
    error_headline,
    group_metrics,
    parse_overrides,
    shared_overrides,
    summary_frame,
    summary_markdown,
)
from idc_lightning.eval import evaluate

FAST = ["trainer.max_epochs=1", "trainer.limit_train_batches=2"]
OFFLINE_ENV = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def cli_command(module: str, data_dir: Path, *overrides: str) -> list[str]:
    """An entry point on the tiny synthetic set; flags such as `-m` go first, as Hydra's argparse needs."""
    flags = [o for o in overrides if o.startswith("-")]
    return [
        sys.executable, "-m", module, *flags, "data=synthetic", *(f"data.synthetic.{k}={v}" for k, v in TINY.items()),
        "data.num_workers=0", "data.batch_size=32", "model.pretrained=false", "extras.print_config=false",
        f"paths.data_dir={data_dir}", f"paths.cache_dir={data_dir}/cache", *(o for o in overrides if o not in flags),
    ]


def cli(module: str, data_dir: Path, *overrides: str, timeout: int = 300, check: bool = True,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(cli_command(module, data_dir, *overrides), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**OFFLINE_ENV, **(env or {})})
    if check:
        assert done.returncode == 0, done.stderr[-4000:]
    return done


# --- summary table functions -------------------------------------------------------------------------------------


def _row(job: int, lr: str, fold: int, auroc: float | None, error: str = "") -> dict:
    row = {"job": str(job), "data": "synthetic", "model.optimizer.lr": lr, "data.fold": str(fold),
           "status": "failed" if auroc is None else "completed", "error": error, "run_dir": f"/sweep/{job}"}
    if auroc is not None:
        row.update({"test/auroc": auroc, "test/f1@val_thr": 0.5, "val/auroc": auroc - 0.1})
    return row


def test_parse_overrides_strips_hydra_prefixes() -> None:
    assert parse_overrides(["+experiment=demo", "++a.b=1=2", "~callbacks.heatmap", "data.fold=3"]) == {
        "experiment": "demo", "a.b": "1=2", "callbacks.heatmap": "<deleted>", "data.fold": "3"}


def test_group_metrics_averages_folds_per_setting_and_skips_failed_jobs() -> None:
    frame = summary_frame([
        _row(0, "1e-3", 0, 0.8), _row(1, "1e-3", 1, 0.9), _row(2, "3e-4", 0, 0.6), _row(3, "3e-4", 1, None, "boom"),
    ])
    table = group_metrics(frame)
    assert list(table["model.optimizer.lr"]) == ["1e-3", "3e-4"]  # best val/auroc first; data (constant) dropped
    assert list(table["n"]) == [2, 1]
    assert table.loc[0, "test/auroc mean"] == pytest.approx(0.85)
    assert table.loc[0, "test/auroc std"] == pytest.approx(math.sqrt(0.005))  # sample std of 0.8, 0.9
    assert math.isnan(table.loc[1, "test/auroc std"])
    assert "test/bal_acc@val_thr mean" not in table  # metrics no job reported are left out, not filled with NaN


def test_summary_markdown_shows_mean_std_shared_overrides_and_failures() -> None:
    error = "Traceback (most recent call last):\n  ...\nValueError: dropout must be in [0, 1]\nfull_key: model"
    frame = summary_frame([_row(0, "1e-3", 0, 0.8), _row(1, "1e-3", 1, 0.9), _row(2, "3e-4", 0, None, error)])
    text = summary_markdown(frame, shared=["+experiment=demo", "data=synthetic"])
    assert "Shared overrides: `+experiment=demo` `data=synthetic`" in text
    assert "| model.optimizer.lr | n | test/auroc | test/f1@val_thr | val/auroc |" in text
    assert "| 1e-3 | 2 | 0.8500 ± 0.0707 | 0.5000 ± 0.0000 | 0.7500 ± 0.0707 |" in text
    assert "3 jobs: 2 completed, 1 failed" in text
    assert "| 2 | 3e-4 | ValueError: dropout must be in [0, 1] |" in text
    assert error_headline(error) == "ValueError: dropout must be in [0, 1]"
    assert "Partial" not in text
    frame["test/coverage"] = [1.0, 0.085, None]
    assert "**Partial test**: jobs scored as little as 8.5% of their test patches" in summary_markdown(frame)


def test_the_fold_ensemble_eval_gets_the_sweeps_hardware_and_paths_but_no_sweep() -> None:
    overrides = ["data.fold=range(2)", "trainer=ddp", "trainer.num_nodes=2", "+trainer.precision=16-mixed",
                 "paths.cache_dir=/c", "paths.output_dir=/elsewhere", "data=x", "trainer.devices=1,2",
                 "data.num_workers=0", "data.batch_size=64", "model.optimizer.lr=1e-3"]
    assert forwarded_overrides(overrides) == ["trainer=ddp", "trainer.num_nodes=2", "+trainer.precision=16-mixed",
                                              "paths.cache_dir=/c", "data.num_workers=0", "data.batch_size=64"]
    awkward = "/runs/it's, [odd] = yes"
    parsed = OverridesParser.create().parse_overrides([f"ckpt_path={quoted(awkward)}"])[0]
    assert parsed.value() == awkward
    assert quoted("outputs/real_cv/multiruns/2026-11-30_10-00-00") == "outputs/real_cv/multiruns/2026-11-30_10-00-00"
    assert [quoted(name) for name in ("42", "1e3", "true", "null")] == ["'42'", "'1e3'", "'true'", "'null'"]


def test_the_fold_ensemble_runs_after_local_launchers_only() -> None:
    """submitit_local's jobs ran here, so the sweep tests their ensemble; SLURM's may have run on other nodes."""
    from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf

    assert runs_here("hydra._internal.core_plugins.basic_launcher.BasicLauncher")
    assert runs_here(LocalQueueConf._target_)
    assert not runs_here(SlurmQueueConf._target_)


def test_only_the_completed_folds_of_one_setting_are_averaged() -> None:
    folds = summary_frame([_row(0, "1e-3", 0, 0.8), _row(1, "1e-3", 1, 0.9)])
    assert why_not_averaged(folds) is None
    assert "varies model.optimizer.lr" in why_not_averaged(
        summary_frame([_row(0, "1e-3", 0, 0.8), _row(1, "2e-3", 1, 0.9)]))
    assert "jobs ['1'] did not complete" in why_not_averaged(
        summary_frame([_row(0, "1e-3", 0, 0.8), _row(1, "1e-3", 1, None, "boom")]))
    assert "an ensemble needs 2" in why_not_averaged(folds.iloc[:1])


def test_collect_jobs_reads_results_and_explains_missing_ones(tmp_path: Path) -> None:
    for job, lr in enumerate(["1e-3", "3e-4", "1e-4"]):
        (tmp_path / str(job) / ".hydra").mkdir(parents=True)
        (tmp_path / str(job) / ".hydra" / "overrides.yaml").write_text(f"- model.optimizer.lr={lr}\n")
    (tmp_path / "0" / "results.json").write_text(json.dumps({"test/auroc": 0.7, "val/auroc": None}))
    (tmp_path / "1" / "train.log").write_text("[INFO] start\nTraceback (most recent call last):\nRuntimeError: OOM\n")
    frame = collect_jobs(tmp_path)
    assert list(frame["job"]) == ["0", "1", "2"] and list(frame["status"]) == ["completed", "failed", "failed"]
    assert frame.loc[0, "test/auroc"] == 0.7 and math.isnan(frame.loc[0, "val/auroc"])
    assert frame.loc[1, "error"].endswith("RuntimeError: OOM") and frame.loc[2, "error"] == "no results.json"


def test_shared_overrides_keep_hydras_prefixes_whatever_their_order(tmp_path: Path) -> None:
    for job, lines in enumerate([["+experiment=real_cv", "data.fold=0", "~callbacks.heatmap=null"],
                                 ["~callbacks.heatmap=null", "data.fold=1", "+experiment=real_cv"]]):
        (tmp_path / str(job) / ".hydra").mkdir(parents=True)
        (tmp_path / str(job) / ".hydra" / "overrides.yaml").write_text("".join(f"- {line}\n" for line in lines))
    assert shared_overrides(tmp_path) == ["+experiment=real_cv", "~callbacks.heatmap=null"]


# --- the real CLI -------------------------------------------------------------------------------------------------


def test_multirun_writes_the_sweep_summary(tiny_data_dir: Path, tmp_path: Path) -> None:
    # The default sweep folder, as a user gets it: <IDC_ROOT>/outputs/train/multiruns/<time>.
    cli("idc_lightning.train", tiny_data_dir, "-m", "model.optimizer.lr=1e-3,3e-4", *FAST,
        env={"IDC_ROOT": str(tmp_path)})
    [sweep] = (tmp_path / "outputs" / "train" / "multiruns").iterdir()
    summary = pd.read_csv(sweep / "summary.csv")
    assert len(summary) == 2 and list(summary["status"]) == ["completed", "completed"]
    assert summary["test/auroc"].between(0, 1).all() and list(summary["model.optimizer.lr"]) == [1e-3, 3e-4]
    assert "| model.optimizer.lr | n | test/auroc |" in (sweep / "summary.md").read_text()


def test_failed_job_is_recorded_and_the_other_jobs_still_run(tiny_data_dir: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    done = cli("idc_lightning.train", tiny_data_dir, "-m", "model.dropout=0.1,7", *FAST, f"hydra.sweep.dir={sweep}",
               check=False)
    assert done.returncode != 0  # the basic sweeper re-raises the first failure after the whole batch
    summary = pd.read_csv(sweep / "summary.csv")
    assert list(summary["status"]) == ["completed", "failed"]
    assert "dropout probability" in summary.loc[1, "error"] and (sweep / "1" / "error.txt").is_file()


@pytest.mark.slow
def test_optuna_study_in_sqlite_resumes_on_a_second_launch(tiny_data_dir: Path, tmp_path: Path) -> None:
    optuna = pytest.importorskip("optuna")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = ["-m", "hparams_search=optuna", f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=tiny",
             "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=2", *FAST]
    cli("idc_lightning.train", tiny_data_dir, *study, f"hydra.sweep.dir={tmp_path / 'a'}")
    # In parallel: submitit_local runs the batch of n_jobs trials as processes at once.
    cli("idc_lightning.train", tiny_data_dir, *study, "hydra.sweeper.n_jobs=2", "hydra/launcher=submitit_local",
        f"hydra.sweep.dir={tmp_path / 'b'}")
    for sweep in (tmp_path / "a", tmp_path / "b"):
        assert (sweep / "0" / "results.json").is_file() and (sweep / "1" / "results.json").is_file()
        assert (sweep / "optimization_results.yaml").is_file()
        summary = pd.read_csv(sweep / "summary.csv")
        assert len(summary) == 2 and "model.optimizer.lr" in summary and summary["val/auroc"].notna().all()
    trials = optuna.load_study(study_name="tiny", storage=storage).trials
    assert [trial.number for trial in trials] == [0, 1, 2, 3]
    assert all(trial.state == optuna.trial.TrialState.COMPLETE for trial in trials)
    # An unseeded sampler: the second launch does not repeat the first launch's parameters.
    assert len({trial.params["model.optimizer.lr"] for trial in trials}) == 4


def test_wandb_logs_offline_with_the_sweep_as_group(tiny_data_dir: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "wandb_sweep_7f3a"
    cli("idc_lightning.train", tiny_data_dir, "-m", "logger=wandb", *FAST, f"hydra.sweep.dir={sweep}")
    offline = list((sweep / "0" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, "W&B did not run offline (no API key and WANDB_MODE=offline)"
    records = next(offline[0].glob("run-*.wandb")).read_bytes()
    for name in (b"test/auroc", b"val/auroc", b"train/loss"):
        assert name in records, name
    assert b'"group":"wandb_sweep_7f3a"' in records  # the resolved logger config is logged with the run
    images = offline[0] / "files" / "media" / "images"
    # ROC, precision-recall, confusion matrix and reliability diagram
    assert list(images.glob("heatmaps_*.png")) and len(list(images.glob("curves_*.png"))) == 4


def test_wandb_single_run_has_no_group_and_is_offline_without_a_key(make_cfg, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", "/nonexistent")
    monkeypatch.setenv("HOME", "/nonexistent")
    wandb = OmegaConf.to_container(make_cfg("train", ["logger=wandb"]).logger.wandb, resolve=True)
    assert wandb["group"] is None and wandb["offline"] is True


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_matches_a_single_process_eval(tiny_data_dir: Path, tmp_path: Path) -> None:
    """Also: a frozen backbone stays frozen under DDP, weights and BatchNorm statistics alike."""
    initial = resnet18(weights=None).state_dict()
    torch.save(initial, tmp_path / "init.pth")
    cli("idc_lightning.train", tiny_data_dir, "trainer=ddp_cpu", *FAST, f"hydra.run.dir={tmp_path / 'ddp'}",
        f"model.pretrained={tmp_path / 'init.pth'}", "model.freeze_backbone_epochs=1")
    trained = json.loads((tmp_path / "ddp" / "results.json").read_text())
    checkpoint = next((tmp_path / "ddp" / "checkpoints").glob("epoch_*.ckpt"))
    state = torch.load(checkpoint, weights_only=True, map_location="cpu")["state_dict"]
    backbone = {key: value for key, value in initial.items() if not key.startswith("fc.")}
    assert all(torch.equal(state[f"backbone.{key}"], value) for key, value in backbone.items())
    overrides = [f"ckpt_path={checkpoint}", "trainer.accelerator=cpu"]
    evaluated = evaluate(compose_config("eval", tmp_path / "eval", tiny_data_dir, overrides))
    for key in ("test/auroc", "test/f1", "test/auprc", "test/f1@val_thr", "test/tp", "test/fp"):
        assert evaluated[key] == pytest.approx(trained[key], abs=1e-6), key


def _global_step(checkpoint: Path) -> int:
    return torch.load(checkpoint, weights_only=True, map_location="cpu")["global_step"]


@pytest.mark.slow
@pytest.mark.parametrize("kill", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_killed_run_resumes_from_last_checkpoint(kill: signal.Signals, tiny_data_dir: Path, tmp_path: Path) -> None:
    """SIGTERM: resume=<run folder>. SIGKILL: rerun the same command with ckpt_path=last, as a SLURM requeue does.
    Either way one CSV log and one W&B run id continue across the two launches."""
    run_dir, epochs, steps = tmp_path / "run", 4, 8
    overrides = ["trainer.accelerator=cpu", f"trainer.max_epochs={epochs}", f"trainer.limit_train_batches={steps}",
                 "trainer.log_every_n_steps=2", "data.batch_size=8", "callbacks.early_stopping=null",
                 "callbacks.heatmap=null", "logger=many", f"hydra.run.dir={run_dir}"]
    if kill == signal.SIGKILL:
        overrides.append("ckpt_path=last")  # from scratch while there is no last.ckpt
    # Lightning saves through a temporary file in TMPDIR; a kill mid-save leaves it (~130 MB) behind there.
    (tmp_path / "tmp").mkdir()
    first = subprocess.Popen(cli_command("idc_lightning.train", tiny_data_dir, *overrides), cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=(tmp_path / "stderr.txt").open("w"),
                             env={**OFFLINE_ENV, "TMPDIR": str(tmp_path / "tmp")})
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not last.is_file() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # into the second epoch
    first.send_signal(kill)
    first.wait(timeout=60)
    assert not (run_dir / "results.json").exists(), "the run finished before it was killed"
    assert _global_step(last) < epochs * steps
    if kill == signal.SIGTERM:  # Lightning turns SIGTERM into an exception; ModelCheckpoint saves on it
        stderr = (tmp_path / "stderr.txt").read_text()
        assert "Received SIGTERM" in stderr
        # Nothing new to save when the signal lands right after an epoch's checkpoint, before the next step.
        assert "SIGTERMException was raised" in stderr or _global_step(last) % steps == 0, stderr[-2000:]
        cli("idc_lightning.train", tiny_data_dir, f"resume={run_dir}")
    else:
        cli("idc_lightning.train", tiny_data_dir, *overrides)
    assert _global_step(last) == epochs * steps
    assert json.loads((run_dir / "results.json").read_text())["test/auroc"] is not None
    metrics = pd.read_csv(run_dir / "csv" / "metrics.csv")
    training = metrics.dropna(subset=["train/loss_step"])
    assert set(training["epoch"]) == set(range(epochs)) and training["step"].max() == epochs * steps - 1
    if kill == signal.SIGTERM:  # nothing after last.ckpt was logged, so no step is logged twice
        assert training["step"].is_monotonic_increasing and training["step"].is_unique
    run_id = (run_dir / "wandb_run_id.txt").read_text()
    assert [path.name.rsplit("-", 1)[1] for path in (run_dir / "wandb").glob("offline-run-*")] == [run_id] * 2


def test_slurm_launcher_composes_one_task_per_gpu(tiny_data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    submitit = pytest.importorskip("submitit")
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    cfg = compose_config("train", tmp_path / "run", tiny_data_dir, [
        "hydra/launcher=slurm", "trainer=ddp", "trainer.num_nodes=2", "hydra.launcher.partition=gpu",
        "hydra.launcher.gpus_per_node=8"])
    params = dict(instantiate(cfg.hydra.launcher).params)
    assert (params["nodes"], params["gpus_per_node"], params["tasks_per_node"]) == (2, 8, 8)
    # submitit only checks that srun exists: a stub lets it write the sbatch script it would submit.
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    executor = submitit.AutoExecutor(cluster="slurm", folder=tmp_path / "submitit",
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    params.pop("submitit_folder")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    sbatch = executor._executor._make_submission_file_text("python -m idc_lightning.train", "uid")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --requeue", "#SBATCH --signal=USR2@120"):
        assert line in sbatch, line


@pytest.mark.slow
def test_real_cv_experiment_is_one_multirun_over_the_folds(tiny_data_dir: Path, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """+experiment=real_cv needs no -m: one job per fold of data.num_folds, one common test set, one summary, then
    the folds tested as one model."""
    sweep = tmp_path / "cv"
    cli("idc_lightning.train", tiny_data_dir, "+experiment=real_cv", "data.num_folds=2", *FAST,
        "trainer.limit_val_batches=2", "callbacks.heatmap=null", f"hydra.sweep.dir={sweep}")
    splits = [pd.read_csv(sweep / job / "splits.csv", dtype=str) for job in ("0", "1")]
    tests = [set(split.patient_id[split.split == "test"]) for split in splits]
    vals = [set(split.patient_id[split.split == "val"]) for split in splits]
    assert tests[0] == tests[1] and not vals[0] & vals[1]
    summary = (sweep / "summary.md").read_text()
    assert "2 jobs: 2 completed" in summary and "test/f1@val_thr" in summary
    assert "Shared overrides: " in summary and "`+experiment=real_cv`" in summary
    # The ensemble run is the documented eval of the sweep folder, with the sweep's cache forwarded.
    ensemble = json.loads((sweep / "ensemble" / "results.json").read_text())
    with caplog.at_level("WARNING"):
        alone = evaluate(compose_config("eval", tmp_path / "eval", tiny_data_dir, [f"ckpt_path={sweep}"]))
    assert ensemble["test/auroc"] == pytest.approx(alone["test/auroc"], abs=1e-6)
    assert "no best checkpoint" not in caplog.text  # ensemble/ is the sweep's eval run, not a failed job
    assert "## The folds as one model" in summary and f"| {ensemble['test/auroc']:.4f} |" in summary


@pytest.mark.slow
def test_a_sweep_of_settings_is_not_averaged_into_one_model(tiny_data_dir: Path, tmp_path: Path) -> None:
    done = cli("idc_lightning.train", tiny_data_dir, "+experiment=real_cv", "data.num_folds=2",
               "+trainer.fast_dev_run=true", "model.optimizer.lr=1e-3,2e-3", f"hydra.sweep.dir={tmp_path / 'cv'}")
    assert "the sweep varies model.optimizer.lr besides the fold" in done.stderr + done.stdout
    assert not (tmp_path / "cv" / "ensemble").exists()
