"""The pieces of whole-slide prediction without a model: level choice by microns, bounded read windows, stain
mapping as the cache does it, and QuPath GeoJSON geometry."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import shapely

from idc_lightning.data.stain import MACENKO_REFERENCE, macenko_normalize
from idc_lightning.slides.geojson import check_feature_collection, feature_collection, tile_cells
from idc_lightning.slides.readers import SlideReadError
from idc_lightning.slides.scale import working_scale
from idc_lightning.slides.stain_map import stain_map
from idc_lightning.slides.tiles import TileGrid, windows
from idc_lightning.slides.tissue import MAX_READ_PX


@dataclass
class FakeSlide:
    """Just the pyramid facts `working_scale` reads."""

    level_downsamples: tuple[float, ...]
    mpp: float | None
    path: Path = Path("fake.svs")
    at_training_scale: bool = False
    side: int = 40_000

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple((int(self.side / d), int(self.side / d)) for d in self.level_downsamples)


@pytest.mark.parametrize(("downsamples", "mpp", "level", "zoom"), [
    ((1, 4, 16, 64), 0.25, 2, 1.0),  # Aperio 40x: level 2 is the training scale
    ((1, 2, 4, 8, 16, 32), 0.25, 4, 1.0),
    ((1, 2, 4, 8), 0.25, 3, 2.0),  # no 16x level: read 8x and area-halve
    ((1, 4, 16), 0.5, 1, 2.0),  # 20x scan
    ((1, 4, 16), 0.2527, 2, 4.0 / (0.2527 * 16)),  # within 2% of 4 um/px: read as is
])
def test_cheapest_level_at_or_finer_than_the_training_scale(downsamples: tuple[float, ...], mpp: float,
                                                            level: int, zoom: float) -> None:
    scale = working_scale(FakeSlide(downsamples, mpp), 4.0)
    assert (scale.level, scale.zoom) == (level, pytest.approx(zoom))
    assert scale.width == int(40_000 * mpp / 4.0) and scale.level0_per_px == pytest.approx(4.0 / mpp)


def test_scale_errors_say_what_to_do() -> None:
    with pytest.raises(SlideReadError, match=r"fake.svs records no microns per pixel.*predict.mpp=<um"):
        working_scale(FakeSlide((1, 4), None), 4.0)
    with pytest.raises(SlideReadError, match="coarser than the model's 4 um/px"):
        working_scale(FakeSlide((1, 4), 8.0), 4.0)
    assert working_scale(FakeSlide((1, 4), None), 4.0, override=1.0).level == 1


@pytest.mark.parametrize("zoom_mpp", [0.25, 4.0])
def test_read_windows_stay_bounded_whatever_the_slide_size(zoom_mpp: float) -> None:
    scale = working_scale(FakeSlide((1,), zoom_mpp, side=40_000), 4.0)  # a single-level slide: worst case
    xs, ys = np.meshgrid(np.arange(0, scale.width, 50), np.arange(0, scale.height, 50))
    grid = TileGrid(xs.ravel(), ys.ravel(), 50, 50)
    groups = windows(grid, scale)
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(grid)))
    for indices in groups:
        extent = max(np.ptp(grid.x[indices]), np.ptp(grid.y[indices])) + grid.tile
        assert extent * scale.zoom <= MAX_READ_PX + grid.tile * scale.zoom


def test_stain_map_from_a_sample_matches_the_caches_normalisation() -> None:
    rng = np.random.default_rng(0)
    tiles = np.clip(rng.normal((170, 90, 160), 30, (40, 50, 50, 3)), 0, 255).astype(np.uint8)
    mapping = stain_map(tiles, MACENKO_REFERENCE)
    assert mapping is not None
    np.testing.assert_array_equal(mapping(tiles), macenko_normalize(tiles, MACENKO_REFERENCE))
    assert stain_map(np.full((1, 50, 50, 3), 250, np.uint8), MACENKO_REFERENCE) is None  # glass: left as read


def test_idc_regions_merge_tiles_and_keep_holes() -> None:
    xs, ys = np.meshgrid(np.arange(3) * 50, np.arange(3) * 50)
    probs = np.ones(9)
    probs[4] = 0.1  # the centre tile is not IDC: a hole
    cells = tile_cells(xs.ravel(), ys.ravel(), 50, 50, level0_per_px=16)
    collection = feature_collection(cells, probs, np.full(9, 0.7), threshold=0.5, mpp0=0.25)
    check_feature_collection(collection)
    features = collection["features"]
    assert [f["properties"]["objectType"] for f in features] == ["detection"] * 9 + ["annotation"]
    assert features[0]["properties"]["measurements"] == {"IDC probability": 1.0, "Tile IDC probability": 0.7}
    region = shapely.geometry.shape(features[-1]["geometry"])
    assert region.geom_type == "Polygon" and len(region.interiors) == 1
    assert region.bounds == (0, 0, 2400, 2400)  # level-0 pixels: 3 tiles x 50 px x 16
    assert features[-1]["properties"]["classification"]["name"] == "IDC"
    assert features[-1]["properties"]["measurements"]["Area mm2"] == pytest.approx(8 * 0.2 * 0.2)


def test_overlapping_tiles_give_cells_that_add_up() -> None:
    cells = tile_cells(np.array([0, 25, 50]), np.array([0, 0, 0]), 50, 25, level0_per_px=1)
    assert shapely.union_all(cells).area == pytest.approx(sum(cell.area for cell in cells))


def test_schema_check_names_the_bad_feature() -> None:
    bow_tie = {"type": "Polygon", "coordinates": [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]}
    bad = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": bow_tie, "properties": {"objectType": "annotation"}}]}
    with pytest.raises(ValueError, match="feature 0: invalid geometry"):
        check_feature_collection(bad)
    square = {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]}
    unnamed = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": square, "properties": {"objectType": "annotation"}}]}
    with pytest.raises(ValueError, match="feature 0: an annotation needs a classification"):
        check_feature_collection(unnamed)
