"""Write and log per-patient IDC heatmaps after testing (and, optionally, every few validation epochs)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import pandas as pd

from idc_lightning.evaluation.figures import log_images
from idc_lightning.evaluation.heatmaps import write_patient_heatmaps
from idc_lightning.interfaces import EvaluatedModel, PatchSource

log = logging.getLogger(__name__)


class HeatmapCallback(L.Callback):
    """Thin shell over `evaluation.heatmaps.write_patient_heatmaps`: picks patients, writes on rank 0, logs images.

    Reads the model's gathered predictions (`EvaluatedModel.predictions`) in `on_test_end` / `on_validation_end`,
    because callback epoch-end hooks run before the module's, which fill them. Calls are made at the model's
    operating point, so the figures agree with the run's results. Pixels and ground truth come from the datamodule
    (`PatchSource`).
    """

    def __init__(
        self,
        max_patients: int | None = 20,
        every_n_val_epochs: int = 0,
        val_patients: int = 2,
        dirname: str = "heatmaps",
    ) -> None:
        super().__init__()
        self.max_patients = max_patients
        self.every_n_val_epochs = every_n_val_epochs
        self.val_patients = val_patients
        self.dirname = dirname
        self.patient_table: pd.DataFrame | None = None
        self.test_folder: Path | None = None

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        predictions = self._predictions(trainer, pl_module, "test")
        if predictions is None:
            return
        out_dir = Path(trainer.default_root_dir) / self.dirname
        table = self._write(trainer, pl_module, predictions, out_dir, self.max_patients)
        table.to_csv(out_dir / "heatmaps.csv", index=False)
        self.patient_table, self.test_folder = table, out_dir
        self._log(trainer, table, key="heatmaps", dice_key="test/heatmap_dice")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_val_epochs <= 0 or trainer.sanity_checking:
            return
        if (trainer.current_epoch + 1) % self.every_n_val_epochs:
            return
        predictions = self._predictions(trainer, pl_module, "val")
        if predictions is None:
            return
        # The same first patients every time, so epochs can be compared side by side.
        keep = sorted(predictions["patient_id"].astype(str).unique())[: self.val_patients]
        predictions = predictions[predictions["patient_id"].astype(str).isin(keep)]
        out_dir = Path(trainer.default_root_dir) / self.dirname / "val" / f"epoch_{trainer.current_epoch}"
        table = self._write(trainer, pl_module, predictions, out_dir, limit=None)
        self._log(trainer, table, key="val/heatmaps", dice_key="val/heatmap_dice")

    @staticmethod
    def _predictions(trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> pd.DataFrame | None:
        """The module's gathered predictions on rank 0; None elsewhere or when there is nothing to draw."""
        if not trainer.is_global_zero:
            return None
        if not isinstance(pl_module, EvaluatedModel):
            raise TypeError(f"HeatmapCallback needs a model with predictions and an operating_point "
                            f"(interfaces.EvaluatedModel); got {type(pl_module).__name__}")
        predictions = pl_module.predictions.get(split)
        if predictions is None or len(predictions) == 0:
            log.warning("No heatmaps: %s has no %s predictions", type(pl_module).__name__, split)
            return None
        return predictions

    def _write(self, trainer: L.Trainer, model: EvaluatedModel, predictions: pd.DataFrame, out_dir: Path,
               limit: int | None) -> pd.DataFrame:
        source = trainer.datamodule if isinstance(trainer.datamodule, PatchSource) else None
        threshold = model.operating_point.threshold
        table = write_patient_heatmaps(
            predictions,
            patches=source.patches if source is not None else None,
            out_dir=out_dir,
            limit=limit,
            threshold=threshold,
            truth=source.truth if source is not None else None,
        )
        log.info("Wrote %d patient heatmaps to %s (IDC when prob >= %.4f)", len(table), out_dir, threshold)
        return table

    @staticmethod
    def _log(trainer: L.Trainer, table: pd.DataFrame, key: str, dice_key: str) -> None:
        """Images to every logger that takes them; mean Dice only when some patient had ground truth."""
        if table.empty:
            return
        step = trainer.global_step
        log_images(trainer.loggers, key, table["png"].tolist(), table["patient_id"].astype(str).tolist(), step)
        dice = table["dice"].dropna()
        if len(dice):
            for logger in trainer.loggers:
                logger.log_metrics({dice_key: float(dice.mean())}, step=step)
