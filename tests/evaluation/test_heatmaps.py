import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.axes import Axes
from PIL import Image

from idc_lightning.evaluation.heatmaps import (
    DRAW_OVERSAMPLE,
    FIGURE_DPI,
    PANEL_HEIGHT_IN,
    dice,
    render_patient_heatmap,
    write_patient_heatmaps,
)
from idc_lightning.evaluation.slide_grid import GridGeometry, cell_index, grid_geometry, slide_thumbnail, value_grid

KAGGLE_NAME = re.compile(r"(?P<pid>\d+)_idx5_x(?P<x>\d+)_y(?P<y>\d+)_class(?P<label>[01])\.png$")


def _predictions(patients: dict[str, int], seed: int = 0) -> pd.DataFrame:
    """`n` patches per patient on a Kaggle grid (origin 1, step 50) with holes; IDC on the slide's right."""
    rng = np.random.default_rng(seed)
    frames = []
    for patient_id, n in patients.items():
        cells = rng.choice(8 * 6, size=n, replace=False)
        x, y = 1 + 50 * (cells % 8), 1 + 50 * (cells // 8)
        label = (x > 200).astype(int)
        prob = np.clip(0.2 + 0.6 * label + rng.normal(0, 0.1, n), 0, 1)
        frames.append(pd.DataFrame({"patient_id": patient_id, "x": x, "y": y, "label": label, "prob": prob}))
    frame = pd.concat(frames, ignore_index=True)
    frame["cache_index"] = np.arange(len(frame))
    return frame


def test_patch_at_501_101_lands_in_column_10_row_2() -> None:
    x, y = np.array([1001, 501, 151, 351]), np.array([51, 101, 1501, 1001])
    geometry = grid_geometry(x, y)
    assert (geometry.origin_x, geometry.origin_y, geometry.step) == (1, 1, 50)
    rows, cols = cell_index(x, y, geometry)
    assert (rows[1], cols[1]) == (2, 10)
    grid = value_grid(x, y, np.array([0.1, 0.9, 0.3, 0.4]), geometry)
    assert grid.shape == (31, 21)
    assert grid[2, 10] == pytest.approx(0.9)


def test_step_is_derived_from_the_offsets() -> None:
    x = 1 + 25 * np.array([0, 1, 2, 5])
    y = 1 + 25 * np.array([3, 3, 4, 4])
    geometry = grid_geometry(x, y)
    assert geometry == GridGeometry(origin_x=1, origin_y=1, step=25, rows=5, cols=6)
    assert grid_geometry(np.array([501]), np.array([101])).step == 50


def test_a_patch_off_the_grid_does_not_shrink_the_step_but_a_sparse_sample_keeps_its_own() -> None:
    cols, rows = np.meshgrid(np.arange(8), np.arange(6))
    x, y = 1 + 50 * cols.ravel(), 1 + 50 * rows.ravel()
    stray_x, stray_y = np.append(x, 178), np.append(y, 114)  # one file off the 50-px grid
    geometry = grid_geometry(stray_x, stray_y)
    assert geometry == GridGeometry(origin_x=1, origin_y=1, step=50, rows=6, cols=8)
    rows_of, cols_of = cell_index(stray_x, stray_y, geometry)
    assert (rows_of[-1], cols_of[-1]) == (2, 3)  # the cell starting at (151, 101), at or before it
    # Sampled every other column, with one neighbour pair 50 px apart: 100 repeats, but the step is 50.
    sparse_x, sparse_y = np.array([1, 101, 201, 301, 351, 451]), np.array([1, 1, 101, 101, 201, 201])
    assert grid_geometry(sparse_x, sparse_y).step == 50
    # A small patient with one stray, and a large one with two strays at the same odd column offset.
    small = np.arange(9)
    assert grid_geometry(np.append(1 + 50 * (small % 3), 78), np.append(1 + 50 * (small // 3), 64)).step == 50
    cols, rows = np.meshgrid(np.arange(20), np.arange(20))
    x, y = np.append(1 + 50 * cols.ravel(), [178, 378]), np.append(1 + 50 * rows.ravel(), [114, 314])
    assert grid_geometry(x, y).step == 50
    assert grid_geometry(1 + 25 * cols.ravel(), 1 + 25 * rows.ravel()).step == 25


def test_coarser_explicit_step_averages_patches_sharing_a_cell() -> None:
    x, y = np.array([1, 26, 51]), np.array([1, 1, 1])
    geometry = grid_geometry(x, y, step=50)
    grid = value_grid(x, y, np.array([0.2, 0.6, 1.0]), geometry)
    np.testing.assert_allclose(grid, [[0.4, 1.0]])


def test_patch_outside_the_geometry_is_an_error() -> None:
    geometry = grid_geometry(np.array([1, 51]), np.array([1, 1]))
    with pytest.raises(ValueError, match="x=501"):
        cell_index(np.array([501]), np.array([1]), geometry)


def test_glass_is_nan_and_rendered_transparent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = np.array([1, 101, 151]), np.array([1, 1, 1])
    geometry = grid_geometry(x, y)
    grid = value_grid(x, y, np.array([0.0, 1.0, 0.5]), geometry)
    assert grid.dtype == np.float32
    assert grid[0, 0] == 0.0 and math.isnan(grid[0, 1]) and grid[0, 2] == 1.0

    drawn = []
    imshow = Axes.imshow
    monkeypatch.setattr(Axes, "imshow", lambda ax, *a, **k: drawn.append(imshow(ax, *a, **k)) or drawn[-1])
    render_patient_heatmap("p", None, grid, None, {}, tmp_path / "p.png", geometry=geometry)
    (prob_layer,) = drawn
    rgba = prob_layer.to_rgba(prob_layer.get_array())
    assert rgba[0, 1, 3] == 0  # glass cell fully transparent
    assert rgba[0, 0, 3] > 0  # a benign (0.0) patch is drawn


def test_thumbnail_pastes_each_patch_at_its_pixel_offset() -> None:
    x, y = np.array([1, 51, 151]), np.array([1, 101, 1])
    patches = np.zeros((3, 50, 50, 3), dtype=np.uint8)
    patches[1] = (255, 0, 0)
    thumbnail = slide_thumbnail(patches, x, y, grid_geometry(x, y))
    assert thumbnail.shape == (150, 200, 3) and thumbnail.dtype == np.uint8
    assert (thumbnail[100:150, 50:100] == (255, 0, 0)).all()
    assert (thumbnail[0:50, 0:50] == 0).all()
    assert (thumbnail[0:50, 50:150] == 255).all()  # glass stays white


@pytest.mark.parametrize(
    ("pred", "truth", "expected"),
    [
        ([0, 0, 0], [0, 0, 0], math.nan),
        ([1, 0, 0], [0, 0, 0], math.nan),
        ([1, 1, 0], [0, 0, 1], 0.0),
        ([1, 1, 0], [1, 0, 0], 2 / 3),
        ([1, np.nan, 1], [1, 1, np.nan], 1.0),
        ([[True, False], [False, False]], [[True, True], [False, False]], 2 / 3),
    ],
)
def test_dice(pred: list, truth: list, expected: float) -> None:
    """Like F1, Dice is undefined without true IDC: an IDC-free patient is judged by its specificity."""
    assert dice(np.array(pred), np.array(truth)) == pytest.approx(expected, nan_ok=True)


def test_dice_rejects_masks_of_different_shapes() -> None:
    with pytest.raises(ValueError, match="one shape"):
        dice(np.zeros(3, dtype=bool), np.zeros(4, dtype=bool))


def test_a_large_slide_is_drawn_small_over_its_full_extent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 80 x 40 cells of 50 px: a 4,000 x 2,000 px slide, more pixels than its panels of the PNG have.
    rows, cols = 40, 80
    geometry = GridGeometry(origin_x=0, origin_y=0, step=50, rows=rows, cols=cols)
    thumbnail = np.full((rows * 50, cols * 50, 3), 240, dtype=np.uint8)
    thumbnail[:, : cols * 25] = 40  # left half dark tissue
    drawn = []
    imshow = Axes.imshow
    monkeypatch.setattr(Axes, "imshow", lambda ax, *a, **k: drawn.append(imshow(ax, *a, **k)) or drawn[-1])
    render_patient_heatmap("p", thumbnail, np.zeros((rows, cols)), None, {}, tmp_path / "p.png", geometry=geometry)
    slide, background, prob_layer = drawn
    for image in (slide, background):
        pixels = image.get_array()
        # Twice the pixels of its 2:1 panel, not 4,000 x 2,000.
        assert pixels.shape[:2] == (DRAW_OVERSAMPLE * PANEL_HEIGHT_IN * FIGURE_DPI,
                                    2 * DRAW_OVERSAMPLE * PANEL_HEIGHT_IN * FIGURE_DPI)
        assert image.get_extent() == [0.0, 4000.0, 2000.0, 0.0]  # still placed in slide pixels
    # Area-averaged, not subsampled: the dark half stays the left half of the drawn slide.
    half = slide.get_array().shape[1] // 2
    assert (slide.get_array()[:, :half] == 40).all() and (slide.get_array()[:, half:] == 240).all()
    assert prob_layer.get_extent() == [0.0, 4000.0, 2000.0, 0.0]


def test_render_writes_a_readable_png(tmp_path: Path) -> None:
    x, y = np.array([1, 51, 1]), np.array([1, 1, 51])
    geometry = grid_geometry(x, y)
    thumbnail = slide_thumbnail(np.full((3, 50, 50, 3), 200, dtype=np.uint8), x, y, geometry)
    prob = value_grid(x, y, np.array([0.1, 0.8, 0.5]), geometry)
    label = value_grid(x, y, np.array([0, 1, 1]), geometry)
    metrics = {"patches": 3, "predicted_idc_pct": 33.3, "idc_pct": 66.7, "auroc": math.nan, "f1": 0.5}
    path = render_patient_heatmap("8863", thumbnail, prob, label, metrics, tmp_path / "sub" / "8863.png")
    assert path == tmp_path / "sub" / "8863.png" and path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > image.height > 100


def test_write_patient_heatmaps_writes_png_and_npy_per_patient(tmp_path: Path) -> None:
    predictions = _predictions({"9125": 20, "8863": 15, "8864": 10})
    pixels = np.random.default_rng(1).integers(0, 256, (len(predictions), 50, 50, 3), dtype=np.uint8)
    table = write_patient_heatmaps(
        predictions,
        lambda cache_index: pixels[cache_index],
        tmp_path,
        limit=2,
        threshold=0.5,
        truth=lambda patient_id, frame: frame["label"].to_numpy() == 1,
    )
    assert table["patient_id"].tolist() == ["8863", "8864"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["8863.npy", "8863.png", "8864.npy", "8864.png"]
    frame = predictions[predictions["patient_id"] == "8863"]
    grid = np.load(tmp_path / "8863.npy")
    expected = value_grid(frame["x"], frame["y"], frame["prob"], grid_geometry(frame["x"], frame["y"]))
    np.testing.assert_array_equal(grid, expected)
    assert np.isnan(grid).sum() == grid.size - 15
    row = table.iloc[0]
    assert row["patches"] == 15 and 0 <= row["dice"] <= 1 and row["auroc"] > 0.5
    assert Path(row["png"]) == tmp_path / "8863.png"


def test_write_patient_heatmaps_without_pixels_or_labels(tmp_path: Path) -> None:
    predictions = _predictions({"a": 5, "b": 5}).drop(columns=["label", "cache_index"])
    table = write_patient_heatmaps(predictions, None, tmp_path, limit=None, threshold=0.5)
    assert len(table) == 2 and table["auroc"].isna().all() and table["dice"].isna().all()
    assert (tmp_path / "b.png").stat().st_size > 0


def test_write_patient_heatmaps_names_missing_columns(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="prob"):
        write_patient_heatmaps(pd.DataFrame({"patient_id": ["a"], "x": [1], "y": [1]}), None, tmp_path, None, 0.5)


def test_real_patient_rebuilds_its_slide(real_data: Path, tmp_path: Path) -> None:
    patient_dir = real_data / "9125"
    rows, pixels = [], []
    for path in sorted(patient_dir.glob("[01]/*.png")):
        rows.append({k: int(v) for k, v in KAGGLE_NAME.search(path.name).groupdict().items()})
        patch = np.full((50, 50, 3), 255, dtype=np.uint8)  # edge patches can be smaller than 50x50
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"))
        patch[: rgb.shape[0], : rgb.shape[1]] = rgb
        pixels.append(patch)
    predictions = pd.DataFrame(rows).rename(columns={"pid": "patient_id"})
    predictions["patient_id"] = predictions["patient_id"].astype(str)
    predictions["cache_index"] = np.arange(len(predictions))
    noise = np.random.default_rng(0).normal(0, 0.15, len(predictions))
    predictions["prob"] = np.clip(0.15 + 0.7 * predictions["label"] + noise, 0, 1)
    pixels = np.stack(pixels)

    geometry = grid_geometry(predictions["x"], predictions["y"])
    assert (geometry.origin_x, geometry.origin_y, geometry.step) == (1, 1, 50)
    thumbnail = slide_thumbnail(pixels, predictions["x"], predictions["y"], geometry)
    first = predictions.iloc[0]
    left, top = first["x"] - 1, first["y"] - 1
    np.testing.assert_array_equal(thumbnail[top : top + 50, left : left + 50], pixels[0])

    table = write_patient_heatmaps(
        predictions, lambda i: pixels[i], tmp_path, limit=None, threshold=0.5,
        truth=lambda _, f: f["label"].to_numpy() == 1,
    )
    assert table.loc[0, "patches"] == len(predictions) and table.loc[0, "dice"] > 0.8
    assert (tmp_path / "9125.png").stat().st_size > 10_000


def test_stride_25_predictions_keep_their_finer_grid(tmp_path: Path) -> None:
    x, y = np.meshgrid(1 + 25 * np.arange(4), 1 + 25 * np.arange(3))
    predictions = pd.DataFrame({"patient_id": "s", "x": x.ravel(), "y": y.ravel(), "prob": np.linspace(0, 1, 12)})
    predictions["cache_index"] = np.arange(12)
    pixels = np.full((12, 50, 50, 3), 128, dtype=np.uint8)
    table = write_patient_heatmaps(predictions, lambda i: pixels[i], tmp_path, limit=None, threshold=0.5)
    assert table.loc[0, "step"] == 25
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"), np.linspace(0, 1, 12).reshape(3, 4), rtol=1e-6)
