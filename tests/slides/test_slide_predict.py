"""predict on scanner-style whole slides: a patient's slide rebuilt, upsampled 16x to 0.25 um/px and written as a
3-level tiled pyramid gives, without any level or scale option, the predictions of the patient's patch folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import openslide
import pandas as pd
import pytest
from conftest import TINY, compose_config
from scanner import slide_from_patches

from idc_lightning.evaluation.operating_point import is_idc
from idc_lightning.predict import predict
from idc_lightning.slides.geojson import check_feature_collection
from idc_lightning.slides.readers import SlideReadError
from idc_lightning.slides.scan_writer import SCAN_MPP, UPSAMPLE, write_scan

DATASET = f"synthetic_p{TINY['num_patients']}_s{TINY['seed']}/IDC_regular_ps50_idx5"
CELL_MM2 = (50 * 4.0) ** 2 / 1e6
ANY_TISSUE = "predict.min_tissue=0.02"


@pytest.fixture(scope="module")
def patient(tiny_data_dir: Path) -> Path:
    return sorted(p for p in (tiny_data_dir / DATASET).iterdir() if p.is_dir() and p.name.isdigit())[0]


@pytest.fixture(scope="module")
def scans(patient: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("scans")
    slide, _ = slide_from_patches(patient)
    return {metadata: write_scan(slide, folder / f"{metadata}.{'svs' if metadata == 'aperio' else 'tif'}",
                                 metadata) for metadata in ("aperio", "resolution", "none")}


@pytest.fixture(scope="module")
def from_patches(tiny_data_dir: Path, trained_checkpoint: Path, patient: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    return run(tiny_data_dir, tmp_path_factory.mktemp("patches"), trained_checkpoint, patient)


def run(data_dir: Path, out: Path, checkpoint: Path, source: Path, *overrides: str) -> pd.DataFrame:
    return predict(compose_config("predict", out, data_dir, [f"ckpt_path={checkpoint}", f"input={source}",
                                                             *overrides]))


def test_scans_record_their_scale_for_openslide(scans: dict[str, Path]) -> None:
    for metadata in ("aperio", "resolution"):
        slide = openslide.OpenSlide(scans[metadata])
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(SCAN_MPP)
        assert slide.level_count >= 3 and slide.level_downsamples[-1] == pytest.approx(UPSAMPLE)
    assert openslide.OpenSlide(scans["aperio"]).properties["openslide.vendor"] == "aperio"
    assert openslide.PROPERTY_NAME_MPP_X not in openslide.OpenSlide(scans["none"]).properties


@pytest.mark.parametrize("metadata", ["aperio", "resolution"])
def test_scan_predictions_match_the_patch_folder(tiny_data_dir: Path, tmp_path: Path, trained_checkpoint: Path,
                                                 scans: dict[str, Path], from_patches: pd.DataFrame,
                                                 metadata: str) -> None:
    # No level or scale option; Kaggle keeps pale patches (fat, edges) that a tissue mask drops: keep any tissue.
    from_slide = run(tiny_data_dir, tmp_path, trained_checkpoint, scans[metadata], ANY_TISSUE)
    # Working-scale tiles start at pixel 0, the Kaggle patches at 1-based offsets.
    tiles = from_slide.assign(x=from_slide["x"] + 1, y=from_slide["y"] + 1)
    paired = from_patches.merge(tiles, on=["x", "y"], suffixes=("_patch", "_tile"))
    assert len(paired) >= 0.8 * len(from_patches), "the tissue mask dropped too many tissue patches"
    correlation = np.corrcoef(paired["prob_patch"], paired["prob_tile"])[0, 1]
    assert correlation >= 0.95, f"correlation {correlation:.3f} where tiles and patches coincide"

    row = pd.read_csv(tmp_path / "slides.csv").iloc[0]
    assert (row["status"], row["mpp"], row["mpp_source"], row["level"]) == ("ok", SCAN_MPP, "metadata", 2)
    assert row["tiles"] == len(from_slide)
    stem = scans[metadata].stem
    collection = json.loads((tmp_path / f"{stem}.geojson").read_text())
    check_feature_collection(collection)
    kinds = pd.Series([f["properties"]["objectType"] for f in collection["features"]]).value_counts()
    assert kinds["detection"] == len(from_slide)
    # Level-0 coordinates: the slide is 16x the patch grid.
    corners = np.array([f["geometry"]["coordinates"][0] for f in collection["features"][:5]])
    assert corners.max() <= openslide.OpenSlide(scans[metadata]).dimensions[0]
    threshold = json.loads((tmp_path / f"{stem}_prob.json").read_text())["threshold"]
    idc_area = sum(f["properties"]["measurements"]["Area mm2"] for f in collection["features"]
                   if f["properties"]["objectType"] == "annotation")
    patch_idc_area = is_idc(from_patches["prob"], threshold).sum() * CELL_MM2
    assert idc_area == pytest.approx(patch_idc_area, rel=0.10, abs=CELL_MM2 / 2)
    assert row["idc_mm2"] == pytest.approx(idc_area)
    assert (tmp_path / f"{stem}_heatmap.png").is_file()
    grid = np.load(tmp_path / f"{stem}_prob.npy")
    assert np.isfinite(grid).sum() == len(from_slide)


def test_missing_scale_is_an_error_that_says_how_to_pass_it(tiny_data_dir: Path, tmp_path: Path,
                                                            trained_checkpoint: Path, scans: dict[str, Path]) -> None:
    with pytest.raises(SlideReadError, match=r"records no microns per pixel.*predict\.mpp="):
        run(tiny_data_dir, tmp_path / "a", trained_checkpoint, scans["none"])
    given = run(tiny_data_dir, tmp_path / "b", trained_checkpoint, scans["none"], f"predict.mpp={SCAN_MPP}")
    row = pd.read_csv(tmp_path / "b" / "slides.csv").iloc[0]
    assert (row["mpp_source"], row["level"], row["tiles"]) == ("predict.mpp", 2, len(given))


def test_bad_slides_fail_clearly_alone_and_are_listed_in_a_folder(tiny_data_dir: Path, tmp_path: Path,
                                                                  trained_checkpoint: Path,
                                                                  scans: dict[str, Path]) -> None:
    folder = tmp_path / "slides"
    folder.mkdir()
    (folder / "good.svs").write_bytes(scans["aperio"].read_bytes())
    (folder / "garbage.svs").write_bytes(b"not a slide at all" * 100)
    data = scans["aperio"].read_bytes()
    (folder / "truncated.svs").write_bytes(data[: len(data) // 3])
    (folder / "notes.txt").write_text("scanned on Tuesday")
    (folder / ".DS_Store").write_bytes(b"Bud1")  # hidden: skipped, like a MIRAX data folder
    (folder / "case_data").mkdir()
    write_scan(np.full((200, 200, 3), 250, np.uint8), folder / "glass.tif", "resolution")

    expected = {"garbage.svs": "OpenSlide does not recognise", "truncated.svs": "corrupt",
                "notes.txt": "not a slide", "glass.tif": "no tile has"}
    for name, message in expected.items():
        with pytest.raises(SlideReadError, match=message):
            run(tiny_data_dir, tmp_path / name, trained_checkpoint, folder / name)

    predictions = run(tiny_data_dir, tmp_path / "run", trained_checkpoint, folder)
    table = pd.read_csv(tmp_path / "run" / "slides.csv").set_index("slide")
    assert set(table.index) == {"good", "garbage", "truncated", "notes", "glass"}
    assert table.loc["good", "status"] == "ok" and set(predictions["slide"]) == {"good"}
    for name, message in expected.items():
        assert table.loc[Path(name).stem, "status"] == "error" and message in table.loc[Path(name).stem, "error"]
    assert (tmp_path / "run" / "good.geojson").is_file() and not (tmp_path / "run" / "glass.geojson").exists()
