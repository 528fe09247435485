"""python -m idc_lightning.export ckpt_path=PATH [format=onnx|torchscript]: the model for use outside Python.

Writes model.onnx or model.pt (uint8 N×50×50×3 RGB patches in, P(IDC) out; see models/exportable.py), checks it
against the PyTorch module on the same patches, and writes MODEL_CARD.md beside it. ckpt_path may name several
checkpoints (a sweep folder, as for eval): they export as one network giving the mean of their probabilities.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from idc_lightning.builders import print_config_tree
from idc_lightning.callbacks.sweep_summary import ensemble_results
from idc_lightning.checkpoints import EnsembleCheckpoint, RunCheckpoint, read_model_checkpoint
from idc_lightning.model_card import write_model_card
from idc_lightning.models.exportable import ExportedClassifier

log = logging.getLogger(__name__)

FORMATS = {"onnx": "model.onnx", "torchscript": "model.pt"}


class ExportError(RuntimeError):
    """The exported model does not reproduce the PyTorch module."""


def export_onnx(module: ExportedClassifier, example: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(module, (example,), path, dynamo=True, input_names=["patches"], output_names=["idc_prob"],
                      dynamic_shapes=({0: batch},), external_data=False)


def run_onnx(path: Path, patches: np.ndarray) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"patches": patches})[0]


def check_patches(count: int, patch_size: int, seed: int) -> np.ndarray:
    """Synthetic uint8 patches with tissue-like colours; the tests also check real ones."""
    rng = np.random.default_rng(seed)
    base = rng.integers(120, 230, size=(count, 1, 1, 3))
    noise = rng.integers(-40, 40, size=(count, patch_size, patch_size, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def max_difference(module: ExportedClassifier, path: Path, fmt: str, patches: np.ndarray) -> float:
    with torch.no_grad():
        expected = module(torch.from_numpy(patches)).numpy()
    if fmt == "onnx":
        exported = run_onnx(path, patches)
    else:
        with torch.no_grad():
            exported = torch.jit.load(str(path))(torch.from_numpy(patches)).numpy()
    return float(np.abs(exported - expected).max())


def card_metrics(ckpt_path: Any, checkpoint: RunCheckpoint | EnsembleCheckpoint,
                 results: str | None) -> dict[str, float]:
    """The test results the model card reports: the `results` file if given; else the training run's own, or for a
    sweep folder the ensemble evaluation its +experiment=real_cv ended with (none for a hand-made list)."""
    if results is not None:
        path = Path(results)
        if not path.is_file():
            raise FileNotFoundError(f"results={results}: no such file; give the results.json of the run that tested "
                                    f"this model (train or eval), or leave results unset")
    elif isinstance(checkpoint, EnsembleCheckpoint):
        swept = isinstance(ckpt_path, str | Path) and Path(ckpt_path).is_dir()
        return (ensemble_results(Path(ckpt_path)) or {}) if swept else {}
    else:
        path = checkpoint.path.resolve().parents[1] / "results.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def export(cfg: DictConfig) -> Path:
    if cfg.format not in FORMATS:
        raise ValueError(f"format={cfg.format!r}: use one of {', '.join(FORMATS)}")
    if cfg.extras.print_config:
        print_config_tree(cfg)
    checkpoint = read_model_checkpoint(cfg.ckpt_path)
    pre = checkpoint.preprocessing
    module = ExportedClassifier(checkpoint.model(), pre).eval()
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / FORMATS[cfg.format]
    example = torch.zeros((2, pre.patch_size, pre.patch_size, 3), dtype=torch.uint8)
    if cfg.format == "onnx":
        export_onnx(module, example, path)
    else:
        torch.jit.trace(module, example).save(str(path))
    # An odd batch size on purpose: the exported batch dimension must be dynamic.
    difference = max_difference(module, path, cfg.format, check_patches(cfg.check_patches, pre.patch_size, cfg.seed))
    if difference > cfg.tolerance:
        raise ExportError(f"{path} differs from the PyTorch model by {difference:.2e} > tolerance {cfg.tolerance}")
    log.info("Wrote %s (max |difference| to the PyTorch model %.2e on %d patches)", path, difference,
             cfg.check_patches)
    if pre.stain_norm:
        log.warning("The model was trained on %s-normalised patches: normalise each patient's patches to the "
                    "reference in MODEL_CARD.md before feeding them (it needs a whole patient, not one batch)",
                    pre.stain_norm)
    metrics = card_metrics(cfg.ckpt_path, checkpoint, cfg.get("results"))
    write_model_card(output_dir / "MODEL_CARD.md", checkpoint, metrics)
    return path


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    main()
