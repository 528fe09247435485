"""The 8 symmetries of a square patch (the dihedral group D4): histology has no orientation."""

from __future__ import annotations

import torch


def dihedral(images: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th (0..7) element of D4 on the last two dims: k % 4 quarter turns, then a mirror if k >= 4."""
    if not 0 <= k < 8:
        raise ValueError(f"dihedral index must be in 0..7, got {k}")
    rotated = torch.rot90(images, k % 4, dims=(-2, -1))
    return rotated.flip(-1) if k >= 4 else rotated
