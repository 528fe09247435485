"""Stain normalisation of a streamed slide: the slide's stains are estimated once, from a sample of its tissue
tiles, and every window is mapped to the checkpoint's reference with them.

The training cache estimates stains over all of a patient's patches at once; estimating per window would let the
mapping drift across the slide.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The cache's own Macenko steps, so a slide is mapped exactly as training patches were.
from idc_lightning.data.stain import StainReference, estimate_stains, map_stains

# Tiles read to estimate the slide's stains: 500 x 50 x 50 px is over a million tissue pixels.
STAIN_SAMPLE_TILES = 500


@dataclass(frozen=True)
class StainMap:
    """Maps RGB from the slide's stains (`source`) to the checkpoint's `reference`."""

    source: StainReference
    reference: StainReference

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return map_stains(pixels, self.source, self.reference)


def stain_map(sample: np.ndarray, reference: StainReference) -> StainMap | None:
    """None when the sample has too little tissue to estimate from (tiles are then left as read)."""
    source = estimate_stains(sample)
    return None if source is None else StainMap(source, reference)
