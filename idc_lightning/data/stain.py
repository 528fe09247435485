"""H&E colour spaces: batched torch helpers for augmentation and Macenko normalisation for the cache.

Colour deconvolution (Ruifrok & Johnston, 2001) models a brightfield pixel by Beer-Lambert: optical
density OD = -ln(I / I0) is a non-negative mix of one fixed OD vector per stain. Stain concentrations are
one 3x3 matrix product away from OD, which makes stain jitter cheap enough to run on whole GPU batches.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

# Rows: haematoxylin, eosin, DAB OD vectors (Ruifrok & Johnston 2001, as in ImageJ's Colour Deconvolution;
# skimage rounds them). DAB is absent in H&E: it is the residual channel that keeps the map invertible.
_RGB_FROM_HED = np.array([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105], [0.268, 0.570, 0.776]])
RGB_FROM_HED = _RGB_FROM_HED / np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)

# The darkest intensity a uint8 image can record: keeps black pixels at a finite OD (ln 255 ~ 5.5).
MIN_INTENSITY = 1.0 / 255.0

_MATRICES = {"rgb_from_hed": RGB_FROM_HED, "hed_from_rgb": HED_FROM_RGB}


@functools.cache
def _matrix(name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # Copied once per device: a blocking host-to-GPU copy in every batch would stall the GPU queue.
    return torch.as_tensor(_MATRICES[name], dtype=dtype, device=device)


def _channel_matmul(images: torch.Tensor, matrix_name: str, dim: int) -> torch.Tensor:
    weights = _matrix(matrix_name, images.device, images.dtype)
    return (images.movedim(dim, -1) @ weights).movedim(-1, dim)


def rgb_to_od(rgb: torch.Tensor) -> torch.Tensor:
    """Optical density of float RGB in [0, 1] (any layout): OD = -ln(I), with I0 = 1 (white glass)."""
    return -torch.log(rgb.clamp_min(MIN_INTENSITY))


def od_to_rgb(od: torch.Tensor) -> torch.Tensor:
    """Inverse of `rgb_to_od` (not clipped: negative densities give values above 1)."""
    return torch.exp(-od)


def rgb_to_hed(rgb: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Stain concentrations (H, E, DAB, in OD units) of float RGB in [0, 1]; `dim` is the channel axis
    (1 for [B,3,H,W], -1 for [B,H,W,3])."""
    return _channel_matmul(rgb_to_od(rgb), "hed_from_rgb", dim)


def hed_to_rgb(hed: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Float RGB from stain concentrations; the exact inverse of `rgb_to_hed` for intensities >= 1/255."""
    return od_to_rgb(_channel_matmul(hed, "rgb_from_hed", dim))


def mix_channels(images: torch.Tensor, matrix: torch.Tensor, offset: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Per-image affine colour map: out[c] = sum_j matrix[:, c, j] * images[j] + offset[:, c].

    images: [B,...] with 3 channels at `dim`; matrix: [B,3,3]; offset: [B,3]. Three broadcast multiply-adds
    rather than a matmul: as fast on CPU, and exact on GPUs where matmuls may run in TF32.
    """
    shape = [1] * images.dim()
    shape[0], shape[dim] = images.shape[0], 3
    # Contiguous weights and a plain mul first: on CPU a mul by strided [B,3,1,1] weights, or an addcmul that
    # broadcasts all three inputs into a new tensor, measured ~8x slower.
    weights = matrix.transpose(1, 2).contiguous()
    out = images.narrow(dim, 0, 1) * weights[:, 0].reshape(shape)
    for channel in (1, 2):
        out.addcmul_(images.narrow(dim, channel, 1), weights[:, channel].reshape(shape))
    return out.add_(offset.reshape(shape))


def hed_jitter_map(alpha: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The jitter of `hed_jitter` as one affine map of optical density per image: OD' = matrix @ OD + offset.

    Concentrations are linear in OD, so deconvolution, c' = alpha * c + beta and reconvolution fold into one
    3x3 matrix (HED_FROM_RGB diag(alpha) RGB_FROM_HED, for column vectors) and offset (beta RGB_FROM_HED).
    """
    hed_from_rgb = _matrix("hed_from_rgb", alpha.device, alpha.dtype)
    rgb_from_hed = _matrix("rgb_from_hed", alpha.device, alpha.dtype)
    # Products as broadcast sums, not matmuls: GPUs may run float32 matmuls in TF32 (10-bit mantissa).
    rows = ((hed_from_rgb * alpha.unsqueeze(1)).unsqueeze(-1) * rgb_from_hed).sum(2)  # row vectors: od @ rows
    return rows.transpose(1, 2), (beta.unsqueeze(-1) * rgb_from_hed).sum(1)


def hed_jitter(rgb: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Tellez et al. (2018) stain jitter: each stain concentration becomes alpha * c + beta, per image.

    rgb: float [B,3,H,W] (or channels at `dim`) in [0, 1]; alpha, beta: [B, 3], one value per stain channel.
    beta is in OD units, like albumentations' HEStain; skimage-based implementations divide OD by
    ln(1e6) ~ 13.8 first, so their sigma is not comparable. Returns float RGB clipped to [0, 1].
    """
    matrix, offset = hed_jitter_map(alpha, beta)
    # Mapped as log-intensity (-OD), so no pass is spent on negations.
    log_rgb = rgb.clamp_min(MIN_INTENSITY).log_()
    return mix_channels(log_rgb, matrix, -offset, dim).exp_().clamp_max_(1.0)


@dataclass(frozen=True)
class StainReference:
    """Target H&E appearance: unit OD vectors (rows H, E) and the 99th-percentile concentration of each."""

    stain_vectors: np.ndarray
    max_concentrations: np.ndarray


# The reference of Macenko's original implementation, the de facto standard target.
MACENKO_REFERENCE = StainReference(
    stain_vectors=np.array([[0.5626, 0.7201, 0.4062], [0.2159, 0.8012, 0.5581]]),
    max_concentrations=np.array([1.9705, 1.0308]),
)

# Macenko et al. (2009) constants: transmitted light intensity, OD threshold for tissue, angle percentile.
_BACKGROUND_INTENSITY = 240.0
_TISSUE_OD = 0.15
_ANGLE_PERCENTILE = 1.0
# Fewer tissue pixels than this (about one patch's worth) cannot give a stable stain estimate.
_MIN_TISSUE_PIXELS = 2500
# Pen ink, folds and debris absorb all colours alike, so their OD points along grey, and Macenko's extreme angle takes
# them for haematoxylin (6 of the 25 real sample patients got a grey "haematoxylin"). Pixels within about 8 degrees of
# grey are left out of the estimate; haematoxylin lies 13-19 degrees from grey, eosin about 45.
_ACHROMATIC_COSINE = 0.99
# Bump when estimate_stains changes: caches of stain-normalised patches are keyed on it.
STAIN_ESTIMATE_VERSION = 2


def _optical_density(patches: np.ndarray) -> np.ndarray:
    pixels = patches.reshape(-1, 3).astype(np.float32)
    return -np.log((pixels + 1.0) / _BACKGROUND_INTENSITY)


def _tissue(od: np.ndarray) -> np.ndarray:
    """Stained pixels: absorbing in every channel, and not achromatic."""
    tissue = od[(od >= _TISSUE_OD).all(axis=1)]
    cosine_to_grey = tissue.sum(axis=1) / (np.sqrt(3.0) * np.linalg.norm(tissue, axis=1))
    return tissue[cosine_to_grey < _ACHROMATIC_COSINE]


def _stain_vectors(tissue_od: np.ndarray) -> np.ndarray:
    """Macenko: the two extreme angles of tissue OD in the plane of its two main principal axes."""
    _, eigenvectors = np.linalg.eigh(np.cov(tissue_od, rowvar=False))
    plane = eigenvectors[:, [2, 1]]  # eigh sorts ascending: the two largest components
    # OD is non-negative, so orient the first axis along the tissue and measure angles from it.
    plane[:, 0] *= np.sign(plane[:, 0].sum())
    coords = tissue_od @ plane
    angles = np.arctan2(coords[:, 1], coords[:, 0])
    low, high = np.percentile(angles, [_ANGLE_PERCENTILE, 100.0 - _ANGLE_PERCENTILE])
    vectors = np.stack([plane @ [np.cos(a), np.sin(a)] for a in (low, high)])
    vectors *= np.sign(vectors.sum(axis=1, keepdims=True))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    # Haematoxylin absorbs more red than eosin does.
    return vectors if vectors[0, 0] > vectors[1, 0] else vectors[::-1]


def _concentrations(od: np.ndarray, stain_vectors: np.ndarray) -> np.ndarray:
    """Least-squares stain amounts per pixel; one pseudo-inverse for millions of pixels."""
    return od @ np.linalg.pinv(stain_vectors).astype(od.dtype)


def estimate_stains(patches: np.ndarray) -> StainReference | None:
    """Macenko stain vectors and max concentrations over all tissue pixels of `patches` (uint8 [..., 3]).

    Returns None when there is too little tissue to estimate from (e.g. a background-only patient).
    """
    tissue_od = _tissue(_optical_density(patches))
    if len(tissue_od) < _MIN_TISSUE_PIXELS:
        return None
    vectors = _stain_vectors(tissue_od)
    max_conc = np.percentile(_concentrations(tissue_od, vectors), 99, axis=0)
    if np.any(max_conc <= 0):
        return None
    return StainReference(stain_vectors=vectors, max_concentrations=max_conc)


def map_stains(patches: np.ndarray, source: StainReference, reference: StainReference) -> np.ndarray:
    """Re-express pixels stained like `source` as if stained like `reference` (uint8, any leading shape)."""
    od = _optical_density(patches)
    conc = _concentrations(od, source.stain_vectors)
    conc *= reference.max_concentrations / source.max_concentrations
    rgb = _BACKGROUND_INTENSITY * np.exp(-conc @ reference.stain_vectors) - 1.0
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8).reshape(patches.shape)


def macenko_normalize(patches: np.ndarray, reference: StainReference = MACENKO_REFERENCE) -> np.ndarray:
    """Map one patient's patches (uint8 [N,H,W,3]) to the reference stain appearance.

    Stains are estimated over the whole patient at once: a single 50x50 patch is often nearly all one stain,
    which makes per-patch estimates unstable. Input without enough tissue is returned unchanged.
    """
    source = estimate_stains(patches)
    return patches if source is None else map_stains(patches, source, reference)
