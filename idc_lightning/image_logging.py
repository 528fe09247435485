"""Send PNG files to every attached logger that takes images (W&B, TensorBoard); the others keep the files only."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from PIL import Image


def log_images(loggers: Sequence[Logger], key: str, pngs: Sequence[Path | str], captions: Sequence[str],
               step: int) -> None:
    """W&B: one panel `key` with a captioned image per file; TensorBoard: `key/caption` images."""
    if not pngs:
        return
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[str(png) for png in pngs], caption=list(captions), step=step)
        elif isinstance(logger, TensorBoardLogger):
            for caption, png in zip(captions, pngs, strict=True):
                image = np.asarray(Image.open(png).convert("RGB"))
                logger.experiment.add_image(f"{key}/{caption}", image, step, dataformats="HWC")
