"""Scale by microns, not by level: the pyramid level to read and how to resize it to the training scale.

The model saw 50-px patches at the checkpoint's microns per pixel (Kaggle: 40x scans downsampled 16:1, about
4 um/px); a tile must cover the same tissue area, whatever the scanner's resolution and pyramid.
"""

from __future__ import annotations

from dataclasses import dataclass

from idc_lightning.slides.readers import SlideReader, SlideReadError

# A level this close to the training scale is read as is rather than from the next finer level (scanners
# report e.g. 0.2527 um/px for a nominal 0.25).
SCALE_TOLERANCE = 0.02
MPP_HELP = ("find it in the scanner's metadata (Aperio: 'MPP' in the description; QuPath: Image > Pixel width) and "
            "pass predict.mpp=<um per level-0 pixel> (e.g. 0.25 for a 40x scan, 0.5 for 20x)")


@dataclass(frozen=True)
class WorkingScale:
    """Working pixels are at the training scale; `level` is read and resized by `zoom` to reach them."""

    slide_mpp: float  # um per level-0 pixel
    mpp_source: str  # "metadata", "predict.mpp" or "image at the training scale"
    mpp: float  # um per working pixel: the checkpoint's
    level: int
    zoom: float  # level pixels per working pixel (> 1: area downsampling)
    level0_per_px: float  # level-0 pixels per working pixel
    width: int  # working pixels
    height: int


def slide_mpp(reader: SlideReader, override: float | None, training_mpp: float) -> tuple[float, str]:
    """(um per level-0 pixel, where it came from); a slide that records none needs predict.mpp."""
    if override is not None:
        if override <= 0:
            raise SlideReadError(f"predict.mpp={override} must be a positive number of microns per pixel")
        return float(override), "predict.mpp"
    if reader.mpp is not None:
        return reader.mpp, "metadata"
    if reader.at_training_scale:
        return training_mpp, "image at the training scale"
    raise SlideReadError(f"{reader.path} records no microns per pixel, so the pyramid level matching the model's "
                         f"{training_mpp:g} um/px cannot be chosen; {MPP_HELP}")


def working_scale(reader: SlideReader, training_mpp: float, override: float | None = None) -> WorkingScale:
    """The cheapest level at or finer than the training scale, and the resize from it."""
    mpp0, source = slide_mpp(reader, override, training_mpp)
    finer = [level for level, downsample in enumerate(reader.level_downsamples)
             if mpp0 * downsample <= training_mpp * (1 + SCALE_TOLERANCE)]
    if not finer:
        raise SlideReadError(f"{reader.path}: level 0 is at {mpp0:g} um/px ({source}), coarser than the model's "
                             f"{training_mpp:g} um/px; the model needs a scan at least that fine (check predict.mpp)")
    level = max(finer, key=lambda index: reader.level_downsamples[index])
    level0_per_px = training_mpp / mpp0
    width, height = reader.level_dimensions[0]
    return WorkingScale(slide_mpp=mpp0, mpp_source=source, mpp=training_mpp, level=level,
                        zoom=level0_per_px / reader.level_downsamples[level], level0_per_px=level0_per_px,
                        width=int(width / level0_per_px), height=int(height / level0_per_px))
