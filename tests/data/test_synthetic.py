"""The synthetic slides must look like the Kaggle tree to every reader of it, and their truth must match the labels."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from idc_lightning.data.synthetic import MARKER, TREE, SyntheticSlides, read_truth_mask

NAME = re.compile(r"^(?P<pid>\d+)_idx5_x(?P<x>\d+)_y(?P<y>\d+)_class(?P<label>[01])\.png$")
REAL_SAMPLE_IDS = range(8863, 9126)
SMALL = {"num_patients": 8, "seed": 3, "grid_min": 8, "grid_max": 14, "healthy_fraction": 0.25, "workers": 1}


def _patches(root: Path) -> list[dict]:
    """Every patch file under a Kaggle-layout root, parsed."""
    rows = []
    for path in sorted(root.glob("*/*/*")):
        match = NAME.match(path.name)
        assert match, f"unexpected file {path}"
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        rows.append({"path": path, "pid": match["pid"], "x": int(match["x"]), "y": int(match["y"]),
                     "label": int(match["label"]), "image": image})
    return rows


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, list[dict]]:
    out = tmp_path_factory.mktemp("synthetic")
    SyntheticSlides(**SMALL).write(out)
    marker = json.loads((out / MARKER).read_text())
    return out, marker, _patches(out / TREE)


def test_layout_names_and_offsets(written: tuple[Path, dict, list[dict]]) -> None:
    out, marker, patches = written
    assert sorted(p.name for p in (out / TREE).iterdir()) == SyntheticSlides(**SMALL).patient_ids()
    assert len(patches) == marker["summary"]["patches"] > 0
    for patch in patches:
        path = patch["path"]
        assert path.parent.name == str(patch["label"])
        assert path.parent.parent.name == patch["pid"]
        assert int(patch["pid"]) not in REAL_SAMPLE_IDS
        assert (patch["x"] - 1) % 50 == 0 and (patch["y"] - 1) % 50 == 0
        assert patch["image"].ndim == 3 and patch["image"].shape[2] == 3 and patch["image"].dtype == np.uint8
        assert patch["image"].shape[0] <= 50 and patch["image"].shape[1] <= 50
    assert not list(out.glob("*.tmp"))


def test_positive_fraction_and_patients_without_idc(written: tuple[Path, dict, list[dict]]) -> None:
    _, marker, patches = written
    labels = np.array([p["label"] for p in patches])
    assert 0.12 < labels.mean() < 0.45
    assert marker["summary"]["positive_fraction"] == pytest.approx(labels.mean(), abs=1e-3)
    positives = {pid: 0 for pid in SyntheticSlides(**SMALL).patient_ids()}
    for patch in patches:
        positives[patch["pid"]] += patch["label"]
    healthy = [pid for pid, count in positives.items() if count == 0]
    assert len(healthy) == round(SMALL["num_patients"] * SMALL["healthy_fraction"])
    assert marker["summary"]["patients_without_idc"] == len(healthy)


def test_edge_patches_sit_on_the_last_row_or_column(written: tuple[Path, dict, list[dict]]) -> None:
    _, marker, patches = written
    grid = {p["patient_id"]: (p["rows"], p["cols"]) for p in marker["patients"]}
    edges = [p for p in patches if p["image"].shape[:2] != (50, 50)]
    assert edges, "expected some patches cut short at a slide's right/bottom border"
    assert marker["summary"]["edge_patches"] == len(edges)
    for patch in edges:
        rows, cols = grid[patch["pid"]]
        height, width = patch["image"].shape[:2]
        assert height == 50 or patch["y"] == 1 + 50 * (rows - 1)
        assert width == 50 or patch["x"] == 1 + 50 * (cols - 1)


def test_holes_where_glass_was_not_cut(written: tuple[Path, dict, list[dict]]) -> None:
    _, marker, _ = written
    for patient in marker["patients"]:
        assert 0 < patient["patches"] < patient["rows"] * patient["cols"]


def test_truth_masks_agree_with_labels(written: tuple[Path, dict, list[dict]]) -> None:
    out, _, patches = written
    masks = {pid: read_truth_mask(out, pid) for pid in {p["pid"] for p in patches}}
    for patch in patches:
        mask = masks[patch["pid"]]
        assert mask.dtype == bool
        height, width = patch["image"].shape[:2]
        cell = mask[patch["y"]:patch["y"] + 50, patch["x"]:patch["x"] + 50]
        assert cell.shape == (height, width)
        assert int(cell.mean() > 0.5) == patch["label"]
    with pytest.raises(FileNotFoundError, match="No truth mask"):
        read_truth_mask(out, "1")


def test_colours_are_h_and_e_like(written: tuple[Path, dict, list[dict]]) -> None:
    """Pink and purple (green absorbed most), and IDC darker than the rest, as in the real sample."""
    _, _, patches = written
    means = {label: np.mean([p["image"].reshape(-1, 3).mean(0) for p in patches if p["label"] == label], axis=0)
             for label in (0, 1)}
    for blue, green, red in means.values():
        assert green < red and green < blue
    assert means[1].mean() < means[0].mean() - 15


def test_same_seed_same_bytes_whatever_the_worker_count(
    written: tuple[Path, dict, list[dict]], tmp_path: Path
) -> None:
    out, _, _ = written
    SyntheticSlides(**{**SMALL, "workers": 2}).write(tmp_path / "again")
    assert _digest(tmp_path / "again" / TREE) == _digest(out / TREE)
    assert _digest(tmp_path / "again" / "masks") == _digest(out / "masks")
    SyntheticSlides(**{**SMALL, "seed": 4}).write(tmp_path / "other")
    assert _digest(tmp_path / "other" / TREE) != _digest(out / TREE)


def test_ensure_reuses_unchanged_and_rewrites_changed(tmp_path: Path) -> None:
    params = {**SMALL, "num_patients": 2, "grid_max": 10}
    root = SyntheticSlides(**params).ensure(tmp_path)
    assert root == tmp_path / TREE and root.is_dir()
    sentinel = root / "sentinel.txt"
    sentinel.write_text("left by the test")
    marker_mtime = (tmp_path / MARKER).stat().st_mtime_ns

    SyntheticSlides(**{**params, "workers": 2}).ensure(tmp_path)
    assert sentinel.exists() and (tmp_path / MARKER).stat().st_mtime_ns == marker_mtime

    SyntheticSlides(**{**params, "seed": 5}).ensure(tmp_path)
    assert not sentinel.exists()
    assert json.loads((tmp_path / MARKER).read_text())["params"]["seed"] == 5


def test_ensure_rewrites_an_unfinished_write(tmp_path: Path) -> None:
    """No marker means a killed run: whatever is there is replaced."""
    slides = SyntheticSlides(**{**SMALL, "num_patients": 2, "grid_max": 10})
    slides.write(tmp_path)
    (tmp_path / MARKER).unlink()
    sentinel = tmp_path / TREE / "sentinel.txt"
    sentinel.write_text("half-written")
    slides.ensure(tmp_path)
    assert not sentinel.exists() and (tmp_path / MARKER).is_file()


def test_bad_grid_is_refused() -> None:
    with pytest.raises(ValueError, match="grid_min"):
        SyntheticSlides(grid_min=20, grid_max=10)


@pytest.mark.slow
def test_cli_writes_and_prints_the_summary(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "idc_lightning.data.synthetic", str(tmp_path), "--patients", "2", "--seed", "1",
         "--grid-min", "6", "--grid-max", "9", "--workers", "1"],
        capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[2],
    )
    summary = json.loads((tmp_path / MARKER).read_text())["summary"]
    assert f"{summary['patches']} patches of 2 synthetic patients" in result.stdout
    assert len(list((tmp_path / TREE).glob("*/*/*.png"))) == summary["patches"]


def _colour_stats(images: list[np.ndarray]) -> tuple[np.ndarray, float]:
    """Mean BGR and mean HSV saturation over patches."""
    bgr = np.mean([image[..., :3].reshape(-1, 3).mean(0) for image in images], axis=0)
    saturation = np.mean([cv2.cvtColor(image[..., :3], cv2.COLOR_BGR2HSV)[..., 1].mean() for image in images])
    return bgr, float(saturation)


def test_synthetic_slides_resemble_the_real_sample(written: tuple[Path, dict, list[dict]], real_data: Path) -> None:
    """Per class, colour and saturation within a few grey levels of real tissue; IDC share within 10 points.

    Measured on 300 real patches per class of the 25-patient sample: real non-IDC BGR (191, 168, 211),
    saturation 58; IDC (164, 126, 175), 79. Synthetic: (193, 172, 212), 55; (167, 132, 179), 79.
    The IDC share is the full download's (78,786 of 277,524 patches, 28.4%), which the generator aims at:
    the sample's 25 patients hold 22.2%, a per-patient draw, not the dataset's share.
    """
    _, _, synthetic = written
    real = _patches(real_data)
    rng = np.random.default_rng(0)
    for label in (0, 1):
        real_images = [p["image"] for p in real if p["label"] == label]
        real_images = [real_images[i] for i in rng.choice(len(real_images), 300, replace=False)]
        real_bgr, real_saturation = _colour_stats(real_images)
        synthetic_bgr, synthetic_saturation = _colour_stats([p["image"] for p in synthetic if p["label"] == label])
        assert np.abs(real_bgr - synthetic_bgr).max() < 20, (label, real_bgr, synthetic_bgr)
        assert abs(real_saturation - synthetic_saturation) < 12, (label, real_saturation, synthetic_saturation)
    assert abs(np.mean([p["label"] for p in synthetic]) - 78_786 / 277_524) < 0.1
