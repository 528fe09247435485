"""QuPath-ready GeoJSON in level-0 pixels: a detection per tile carrying its IDC probability, and the IDC regions
(tiles at the operating point, merged, holes kept) as annotations classified `IDC`.

QuPath (File > Import objects, or drag the file onto the open slide) reads `objectType`, `classification` and
`measurements` from each feature's properties.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry import mapping, shape
from shapely.geometry.base import BaseGeometry

from idc_lightning.evaluation.operating_point import is_idc

IDC_CLASS = {"name": "IDC", "color": [220, 40, 40]}
# In spatial context (what the operating point applies to), and the tile alone.
PROB_MEASUREMENT = "IDC probability"
PATCH_PROB_MEASUREMENT = "Tile IDC probability"
OBJECT_TYPES = ("detection", "annotation")


def tile_cells(x: np.ndarray, y: np.ndarray, tile: int, stride: int, level0_per_px: float) -> np.ndarray:
    """shapely boxes in level-0 pixels: the stride x stride cell centred on each tile, so overlapping tiles
    (stride < tile) give cells that touch without overlapping and areas add up."""
    offset = (tile - stride) / 2
    left, top = (x + offset) * level0_per_px, (y + offset) * level0_per_px
    size = stride * level0_per_px
    return shapely.box(left, top, left + size, top + size)


def idc_regions(cells: np.ndarray, idc: np.ndarray) -> list[shapely.Polygon]:
    """The IDC cells merged into polygons (one per connected region, holes kept)."""
    merged = shapely.union_all(cells[idc], grid_size=1e-3)
    return [part for part in getattr(merged, "geoms", [merged]) if not part.is_empty]


def _feature(geometry: BaseGeometry, properties: dict[str, object]) -> dict[str, object]:
    return {"type": "Feature", "id": str(uuid.uuid4()), "geometry": mapping(shapely.normalize(geometry)),
            "properties": properties}


def feature_collection(cells: np.ndarray, probs: np.ndarray, patch_probs: np.ndarray, threshold: float,
                       mpp0: float) -> dict[str, object]:
    """Detections first (one per tile, with its probability in context and alone), then the IDC annotations (at
    `threshold` on `probs`) with their area in mm2."""
    detections = [_feature(cell, {"objectType": "detection",
                                  "measurements": {PROB_MEASUREMENT: round(float(p), 5),
                                                   PATCH_PROB_MEASUREMENT: round(float(alone), 5)}})
                  for cell, p, alone in zip(cells, probs, patch_probs, strict=True)]
    annotations = [_feature(region, {"objectType": "annotation", "name": "IDC", "classification": IDC_CLASS,
                                     "measurements": {"Area mm2": region.area * mpp0**2 / 1e6}})
                   for region in idc_regions(cells, is_idc(probs, threshold))]
    return {"type": "FeatureCollection", "features": detections + annotations}


def check_feature_collection(collection: dict[str, object]) -> None:
    """Raise ValueError naming the first feature QuPath would reject or misread."""
    if collection.get("type") != "FeatureCollection" or not isinstance(collection.get("features"), list):
        raise ValueError("not a GeoJSON FeatureCollection with a list of features")
    for number, feature in enumerate(collection["features"]):
        geometry, properties = feature.get("geometry") or {}, feature.get("properties") or {}
        where = f"feature {number}"
        if feature.get("type") != "Feature" or geometry.get("type") not in ("Polygon", "MultiPolygon"):
            raise ValueError(f"{where}: expected a Feature with a Polygon or MultiPolygon geometry")
        if not shape(geometry).is_valid:
            raise ValueError(f"{where}: invalid geometry ({shapely.is_valid_reason(shape(geometry))})")
        if properties.get("objectType") not in OBJECT_TYPES:
            raise ValueError(f"{where}: objectType {properties.get('objectType')!r} is not one of {OBJECT_TYPES}")
        if properties["objectType"] == "annotation" and "name" not in (properties.get("classification") or {}):
            raise ValueError(f"{where}: an annotation needs a classification with a name")
        if not isinstance(properties.get("measurements", {}), dict):
            raise ValueError(f"{where}: measurements must be a name -> number object")


def write_geojson(collection: dict[str, object], path: Path) -> Path:
    check_feature_collection(collection)
    path.write_text(json.dumps(collection))
    return path
