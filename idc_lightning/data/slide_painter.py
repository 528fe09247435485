"""Paint a synthetic H&E slide: tissue, fat, stroma and IDC as stain concentrations mixed by Beer-Lambert.

Each slide is one image of hematoxylin (nuclei) and eosin (stroma) densities, so colours behave like a stain and a
patient's stain variation is a change of its stain vectors. The truth is the smooth tumour outline (as a
pathologist draws it), while the painted tumour has a ragged, infiltrating border of width `border_noise`.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from idc_lightning.preprocessing import PATCH_SIZE as PATCH

# Coarse layers (tissue, fat, tumour outlines) are drawn on a grid this many pixels apart and upsampled.
COARSE = 10

# Effective optical densities per unit stain (R, G, B), calibrated against the real sample's colour statistics.
HEMATOXYLIN = np.array([0.75, 0.95, 0.50], np.float32)
EOSIN = np.array([0.27, 0.90, 0.56], np.float32)
GLASS_RGB = np.array([240.0, 236.0, 239.0], np.float32)


def cell_share(mask: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Share of each grid cell's actual pixels (edge cells are smaller) that are set in mask."""
    height, width = mask.shape
    padded = np.zeros((rows * PATCH, cols * PATCH), np.float32)
    padded[:height, :width] = mask
    counts = padded.reshape(rows, PATCH, cols, PATCH).sum(axis=(1, 3))
    cell_h = np.minimum(PATCH, height - PATCH * np.arange(rows))
    cell_w = np.minimum(PATCH, width - PATCH * np.arange(cols))
    return counts / np.outer(cell_h, cell_w)


def _noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Zero-mean, unit-variance random field with features about `scale` pixels wide (drawn coarse, upsampled)."""
    height, width = shape
    coarse_shape = (max(2, round(height / scale) + 1), max(2, round(width / scale) + 1))
    coarse = cv2.GaussianBlur(rng.standard_normal(coarse_shape, dtype=np.float32), (0, 0), 0.7)
    coarse /= coarse.std() + 1e-6
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)


def _blobs(
    rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, centres: np.ndarray, radii: np.ndarray
) -> np.ndarray:
    """Maximum of anisotropic, randomly rotated gaussians at (y, x) centres with (y, x) radii, in yy/xx units."""
    field = np.zeros(np.broadcast_shapes(yy.shape, xx.shape), np.float32)
    for (cy, cx), (ry, rx) in zip(centres, radii, strict=True):
        angle = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = (dx * np.cos(angle) + dy * np.sin(angle)) / rx
        v = (-dx * np.sin(angle) + dy * np.cos(angle)) / ry
        np.maximum(field, np.exp(-0.5 * (u * u + v * v)), out=field)
    return field


@dataclass
class PaintedSlide:
    """A rendered slide: the image of the cells round its tissue only (glass is never cut, and it is most of
    the slide), at (top, left) in slide pixels, and the whole slide's tissue and annotated IDC masks."""

    bgr: np.ndarray
    top: int
    left: int
    tissue: np.ndarray
    truth: np.ndarray


def render_slide(rng: np.random.Generator, height: int, width: int, idc_target: float, tissue_fraction: float,
                  border_noise: float) -> PaintedSlide:
    """Lay out tissue, fat and tumour on a coarse grid, then render the cells round the tissue in full."""
    coarse_shape = (-(-height // COARSE), -(-width // COARSE))
    yy = (np.arange(coarse_shape[0], dtype=np.float32)[:, None] + 0.5) / coarse_shape[0]
    xx = (np.arange(coarse_shape[1], dtype=np.float32)[None, :] + 0.5) / coarse_shape[1]

    # Tissue: a few overlapping lobes kept off the slide's borders, except that on some slides one lobe runs
    # over the cut bottom or right border, which makes edge patches there.
    n_lobes = int(rng.integers(1, 4))
    centres = rng.uniform(0.3, 0.7, size=(n_lobes, 2))
    sides = [yy, xx, 1 - yy, 1 - xx]
    if rng.random() < 0.35:
        open_side = int(rng.integers(2, 4))
        centres[0, open_side - 2] = rng.uniform(0.85, 1.0)
        del sides[open_side]
    margin = np.minimum.reduce(np.broadcast_arrays(*sides))
    tissue_field = _blobs(rng, yy, xx, centres, rng.uniform(0.18, 0.4, size=(n_lobes, 2))) \
        + 0.35 * _noise(rng, coarse_shape, max(coarse_shape) / 5) + 0.1 * _noise(rng, coarse_shape, 3) \
        - 2.0 * np.clip(1 - margin / 0.08, 0, 1)
    share = float(np.clip(tissue_fraction * rng.uniform(0.7, 1.3), 0.05, 0.95))
    tissue_field -= float(np.quantile(tissue_field, 1 - share))
    in_tissue = tissue_field > 0

    # Fat lies mostly towards the tissue's periphery; its share varies a lot between patients.
    fat_field = _noise(rng, coarse_shape, 25) - 2.0 * tissue_field
    fat_field -= float(np.quantile(fat_field[in_tissue], 1 - rng.uniform(0.25, 0.65)))

    tumour_field = np.full(coarse_shape, -1.0, np.float32)
    if idc_target > 0:
        n_foci = int(rng.integers(1, 5))
        candidates = np.argwhere(in_tissue)
        foci = (candidates[rng.integers(0, len(candidates), size=n_foci)] + 0.5) / np.array(coarse_shape)
        tumour_field = _blobs(rng, yy, xx, foci, rng.uniform(0.06, 0.2, size=(n_foci, 2))) \
            + 0.3 * _noise(rng, coarse_shape, 12)
        tumour_field[~in_tissue] = -1.0
        tumour_field -= float(np.quantile(tumour_field[in_tissue], 1 - idc_target))

    # The crop: whole cells round the tissue, with one cell to spare for the fine tissue edge.
    cell = PATCH // COARSE
    used_y, used_x = np.flatnonzero(in_tissue.any(axis=1)), np.flatnonzero(in_tissue.any(axis=0))
    top, left = max(used_y[0] // cell - 1, 0) * PATCH, max(used_x[0] // cell - 1, 0) * PATCH
    bottom, right = min((used_y[-1] // cell + 2) * PATCH, height), min((used_x[-1] // cell + 2) * PATCH, width)
    shape = (bottom - top, right - left)

    def upsample(field: np.ndarray) -> np.ndarray:
        block = field[top // COARSE:-(-bottom // COARSE), left // COARSE:-(-right // COARSE)]
        size = (block.shape[1] * COARSE, block.shape[0] * COARSE)
        return cv2.resize(block, size, interpolation=cv2.INTER_LINEAR)[:shape[0], :shape[1]]

    tissue_fine = upsample(tissue_field) + 0.03 * _noise(rng, shape, 12)
    tissue = tissue_fine > 0
    tumour_fine = upsample(tumour_field)
    truth = (tumour_fine > 0) & tissue
    # The tumour as it grows: the annotated outline plus a ragged, infiltrating border.
    tumour = np.clip((tumour_fine + 0.25 * border_noise * _noise(rng, shape, 14)) / 0.06 + 0.5, 0, 1)
    tumour *= tissue
    fat = (upsample(fat_field) - 0.8 * tumour > 0) & tissue

    ducts, lumen, lymph = _structures(rng, shape, tissue & (tumour < 0.5))
    hema, eosin = _stains(rng, shape, tissue, fat, tumour, ducts, lumen, lymph)
    # Soft tissue edge: the stain fades out over a few pixels instead of a hard cut-out.
    alpha = np.clip(tissue_fine / 0.02, 0, 1)
    hema *= alpha
    eosin *= alpha

    tissue_full = np.zeros((height, width), bool)
    truth_full = np.zeros((height, width), bool)
    tissue_full[top:bottom, left:right] = tissue
    truth_full[top:bottom, left:right] = truth
    return PaintedSlide(_to_bgr(rng, hema, eosin), top, left, tissue_full, truth_full)


def _structures(
    rng: np.random.Generator, shape: tuple[int, int], allowed: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Benign ducts (epithelial rings round a lumen) and lymphocyte aggregates: dense nuclei that are not IDC."""
    ducts = np.zeros(shape, np.uint8)
    lumen = np.zeros(shape, np.uint8)
    lymph = np.zeros(shape, np.uint8)
    spots = np.argwhere(allowed[::8, ::8]) * 8
    area = len(spots) * 64
    for _ in range(rng.poisson(area / 40_000)):
        # Ducts come in lobules: a few close together.
        cy, cx = spots[rng.integers(len(spots))]
        for _ in range(int(rng.integers(1, 6))):
            centre = (int(cx + rng.normal(0, 18)), int(cy + rng.normal(0, 18)))
            axes = (int(rng.integers(5, 14)), int(rng.integers(4, 11)))
            angle = float(rng.uniform(0, 180))
            cv2.ellipse(ducts, centre, axes, angle, 0, 360, 1, -1)
            inner = (max(1, axes[0] - int(rng.integers(3, 6))), max(1, axes[1] - int(rng.integers(3, 6))))
            cv2.ellipse(lumen, centre, inner, angle, 0, 360, 1, -1)
    for _ in range(rng.poisson(area / 120_000)):
        cy, cx = spots[rng.integers(len(spots))]
        axes = (int(rng.integers(8, 26)), int(rng.integers(6, 20)))
        cv2.ellipse(lymph, (int(cx), int(cy)), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    return ducts.astype(bool) & allowed, lumen.astype(bool) & allowed, lymph.astype(bool) & allowed


def _fat_membranes(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Adipocyte outlines: the borders of a Voronoi tessellation of jittered seeds 9 to 14 px apart."""
    height, width = shape
    step = int(rng.integers(9, 15))
    gy, gx = np.mgrid[0:height:step, 0:width:step]
    sy = np.clip(gy + rng.integers(0, step, gy.shape), 0, height - 1)
    sx = np.clip(gx + rng.integers(0, step, gx.shape), 0, width - 1)
    seeds = np.full(shape, 255, np.uint8)
    seeds[sy, sx] = 0
    _, labels = cv2.distanceTransformWithLabels(seeds, cv2.DIST_L2, 3, labelType=cv2.DIST_LABEL_CCOMP)
    border = np.zeros(shape, bool)
    border[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    border[1:, :] |= labels[1:, :] != labels[:-1, :]
    return border


def _stains(
    rng: np.random.Generator,
    shape: tuple[int, int],
    tissue: np.ndarray,
    fat: np.ndarray,
    tumour: np.ndarray,
    ducts: np.ndarray,
    lumen: np.ndarray,
    lymph: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Hematoxylin and eosin concentration maps (float32 (H, W)) from the tissue layout."""
    # IDC grows as nests and cords of cells in a desmoplastic stroma; how packed varies between patients.
    nest_share = float(rng.uniform(0.3, 0.75))
    nest_field = _noise(rng, shape, float(rng.uniform(5, 9)))
    nests = tumour * (nest_field > float(np.quantile(nest_field[::7, ::7], 1 - nest_share))) * ~fat
    # float32 masks: arithmetic on bool arrays would silently promote every layer to float64.
    fat_f, ducts_f, lymph_f, open_f = (m.astype(np.float32) for m in (fat, ducts, lymph, ~lumen))
    stroma = (tissue & ~fat & ~ducts & ~lymph).astype(np.float32)

    # Nuclei: a Poisson field of impulses blurred into discs; IDC nuclei are denser, larger and pleomorphic.
    small_rate = (0.006 + 0.01 * tumour) * stroma + 0.0006 * fat_f + 0.045 * ducts_f + 0.1 * lymph_f
    small_rate *= (1 - nests) * open_f
    large_rate = nests * (0.07 * float(rng.uniform(0.5, 1.2)))
    nuclei = _nuclei(rng, small_rate, 1.15 + 0.35 * lymph_f, sigma=0.9, spread=0.25)
    nuclei += _nuclei(rng, large_rate, np.float32(1.2), sigma=1.0, spread=0.35)
    nuclei *= 1 + 0.3 * _noise(rng, shape, 1.5)
    coverage = np.clip((nuclei - 0.35) * 2.2, 0, 1)
    coverage *= float(rng.uniform(0.65, 1.0)) + 0.05 * nests + 0.2 * lymph_f + 0.1 * _noise(rng, shape, 3)

    eosin = _collagen(rng, shape)
    # Desmoplastic stroma round IDC is denser collagen: real IDC patches are darker and more saturated.
    eosin *= float(rng.uniform(0.35, 0.75)) * (1 + 0.5 * tumour) * (1 - nests)
    eosin += 0.55 * nests
    eosin[ducts] = 0.45
    eosin[fat] = 0.02
    eosin[fat & _fat_membranes(rng, shape)] = 0.5
    eosin[lumen] = 0.1
    eosin *= tissue

    # Cytoplasm of epithelial and tumour cells takes up some hematoxylin: a purple haze under the nuclei.
    hema = (float(rng.uniform(0.0, 0.12)) + 0.1 * tumour) * stroma + float(rng.uniform(0.06, 0.22)) * nests
    hema += 0.12 * ducts_f + 0.06 * lymph_f
    hema *= open_f
    hema += coverage
    return hema, eosin


def _collagen(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Eosin texture of stroma: streaky fibres whose direction drifts across the slide, with loose patches."""
    grain = cv2.GaussianBlur(rng.random(shape, dtype=np.float32), (0, 0), 0.7)
    # Fibre direction as a doubled angle: the squared positive parts of its cosine and sine weigh the 0, 90,
    # 45 and 135 degree line filters, and those four weights always sum to 1.
    doubled = (2 * np.pi) * _noise(rng, shape, 150)
    cos, sin = np.cos(doubled), np.sin(doubled)
    line = np.zeros((11, 11), np.float32)
    line[5] = 1 / 11
    diagonal = np.eye(11, dtype=np.float32) / 11
    fibres = np.zeros(shape, np.float32)
    for weight, kernel in ((np.maximum(cos, 0), line), (np.minimum(cos, 0), line.T),
                           (np.maximum(sin, 0), diagonal), (np.minimum(sin, 0), np.fliplr(diagonal))):
        fibres += weight * weight * cv2.filter2D(grain, -1, kernel)
    fibres -= fibres[::5, ::5].mean()
    fibres /= fibres[::5, ::5].std() + 1e-6
    looseness = np.clip(1.1 - 0.45 * _noise(rng, shape, 30), 0.2, 1.5)
    # Clefts: thin white cracks along the zero lines of a smooth field, where the section tore.
    clefts = np.abs(_noise(rng, shape, 12)) < float(rng.uniform(0.0, 0.08))
    texture = 1 + 0.3 * fibres + 0.15 * _noise(rng, shape, 4)
    texture *= looseness
    texture[clefts] = 0
    return np.maximum(texture, 0.02, out=texture)


def _nuclei(rng: np.random.Generator, rate: np.ndarray, amplitude: np.ndarray | np.float32, sigma: float,
            spread: float) -> np.ndarray:
    """Blurred impulses at a per-pixel rate; an impulse of amplitude a peaks at a, so a sets the nucleus size."""
    hits = rng.random(rate.shape, dtype=np.float32) < rate
    impulses = np.zeros(rate.shape, np.float32)
    amp = np.broadcast_to(amplitude, rate.shape)[hits]
    impulses[hits] = amp * rng.lognormal(0.0, spread, size=amp.shape).astype(np.float32)
    return cv2.GaussianBlur(impulses, (0, 0), sigma) * np.float32(2 * np.pi * sigma * sigma)


def _to_bgr(rng: np.random.Generator, hema: np.ndarray, eosin: np.ndarray) -> np.ndarray:
    """Beer-Lambert mix with this patient's stain vectors and strengths, plus scanner noise; BGR uint8 for cv2."""
    h_vec = np.clip(HEMATOXYLIN + rng.normal(0, 0.05, 3), 0.05, None) * rng.uniform(0.75, 1.3)
    e_vec = np.clip(EOSIN + rng.normal(0, 0.05, 3), 0.02, None) * rng.uniform(0.7, 1.35)
    glass = GLASS_RGB + rng.normal(0, 3, 3)
    # Sensor noise shared by the channels (std 2.3): a third of the random numbers of per-channel noise.
    grain = (rng.random(hema.shape, dtype=np.float32) - np.float32(0.5)) * np.float32(8)
    channels = []
    for c in (2, 1, 0):
        value = cv2.exp(-(float(h_vec[c]) * hema + float(e_vec[c]) * eosin))
        value *= float(glass[c])
        value += grain
        channels.append(np.clip(value, 0, 255).astype(np.uint8))
    return cv2.merge(channels)
