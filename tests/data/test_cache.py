from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from idc_lightning.data.cache import PatchDecodeError, PatchReadError, _publish, build_cache, decode_patch
from idc_lightning.data.cache_dir import CacheDirNotWritableError
from idc_lightning.data.manifest import build_manifest, scan_tree


def write(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


@pytest.fixture
def odd_tree(tmp_path: Path) -> Path:
    """One patient with every oddity of the real download: RGBA, grey, edge-sized, corrupt, truncated."""
    root = tmp_path / "root"
    rgb = np.zeros((50, 50, 3), np.uint8)
    rgb[..., 0] = 200
    write(root / "9000/0/9000_idx5_x1_y1_class0.png", rgb)
    rgba = np.dstack([rgb, np.full((50, 50), 255, np.uint8)])
    write(root / "9000/0/9000_idx5_x51_y1_class0.png", rgba)
    write(root / "9000/1/9000_idx5_x101_y1_class1.png", np.full((50, 50), 90, np.uint8))
    write(root / "9000/1/9000_idx5_x151_y1_class1.png", rgb[:35, :50])
    (root / "9000/1/9000_idx5_x201_y1_class1.png").write_bytes(b"not a png at all")
    good = root / "9000/0/9000_idx5_x1_y1_class0.png"
    (root / "9000/0/9000_idx5_x251_y1_class0.png").write_bytes(good.read_bytes()[:40])
    return root


def test_an_empty_and_a_truncated_file_say_which_they_are(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    with pytest.raises(PatchDecodeError, match=r"empty file \(0 bytes\): extract it from the zip again"):
        decode_patch(tmp_path / "empty.png")
    with pytest.raises(PatchDecodeError, match=r"38 bytes, corrupt or truncated\): extract it"):
        decode_patch(tmp_path / "cut.png")


def test_decode_normalises_modes_and_pads_edges(odd_tree: Path) -> None:
    rgba = decode_patch(odd_tree / "9000/0/9000_idx5_x51_y1_class0.png")
    assert rgba.shape == (50, 50, 3) and tuple(rgba[0, 0]) == (200, 0, 0)
    grey = decode_patch(odd_tree / "9000/1/9000_idx5_x101_y1_class1.png")
    assert tuple(grey[10, 10]) == (90, 90, 90)
    edge = decode_patch(odd_tree / "9000/1/9000_idx5_x151_y1_class1.png", pad_value=255)
    assert tuple(edge[34, 0]) == (200, 0, 0) and tuple(edge[35, 0]) == (255, 255, 255)


def test_cache_keeps_every_row_as_cached_or_skipped(odd_tree: Path, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    manifest, _ = scan_tree(odd_tree)
    cache = build_cache(manifest, odd_tree, tmp_path / "cache", workers=1)
    assert len(cache.rows) + len(cache.skipped) == len(manifest) == 6
    assert sorted(Path(p).name for p in cache.skipped.path) == [
        "9000_idx5_x201_y1_class1.png", "9000_idx5_x251_y1_class0.png"]
    assert (cache.folder / "skipped.csv").is_file() and "Skipped 2" in caplog.text
    first = cache.rows.set_index("x").loc[1, "cache_index"]
    assert tuple(cache.images[first][0, 0]) == (200, 0, 0)
    reused = build_cache(manifest, odd_tree, tmp_path / "cache", workers=1)
    assert reused.folder == cache.folder and reused.rows.equals(cache.rows)


def test_edge_patches_are_padded_counted_and_keep_their_size(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """The download's slide-edge patches (50x35, and 1-px strips on the real sample) are used, and said so."""
    root = tmp_path / "root"
    tissue = np.full((50, 50, 3), 180, np.uint8)
    write(root / "9000/0/9000_idx5_x1_y1_class0.png", tissue)
    (root / "9000/0/9000_idx5_x26_y1_class0.png").write_bytes(b"truncated")  # a dropped row between edge patches
    write(root / "9000/0/9000_idx5_x51_y1_class0.png", tissue[:35])
    write(root / "9000/0/9000_idx5_x101_y1_class0.png", tissue[:, :1])
    caplog.set_level(logging.INFO, logger="idc_lightning.data.cache")
    manifest, _ = scan_tree(root)
    cache = build_cache(manifest, root, tmp_path / "cache", workers=1)
    assert list(cache.skipped.path) == ["9000/0/9000_idx5_x26_y1_class0.png"]
    sizes = cache.rows.set_index("x")[["height", "width"]]
    assert [sizes.loc[x].tolist() for x in (1, 51, 101)] == [[50, 50], [35, 50], [50, 1]]
    assert json.loads((cache.folder / "meta.json").read_text())["padded"] == 2
    assert "Padded 2 slide-edge patches smaller than 50x50 px with data.pad_value=255, 1 of them under 10 px" in (
        caplog.text)
    assert "9000_idx5_x101_y1_class0.png (1x50 px)" in caplog.text


def test_a_corrupt_patch_is_read_from_its_duplicate_copy(odd_tree: Path, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """The download holds every file twice: a corrupt kept copy falls back to the other, a good one is never lost."""
    fixed = np.full((50, 50, 3), 120, np.uint8)
    write(odd_tree / "IDC_regular_ps50_idx5/9000/1/9000_idx5_x201_y1_class1.png", fixed)
    (odd_tree / "IDC_regular_ps50_idx5/9000/0").mkdir(parents=True)
    (odd_tree / "IDC_regular_ps50_idx5/9000/0/9000_idx5_x251_y1_class0.png").write_bytes(b"also broken")
    manifest, report = scan_tree(odd_tree)
    assert len(manifest) == 6 and report.duplicates == 2
    cache = build_cache(manifest, odd_tree, tmp_path / "cache", workers=1)
    rescued = cache.rows.set_index("x").loc[201]
    assert np.array_equal(cache.images[rescued["cache_index"]], fixed)
    assert "1 patch files could not be used, so their duplicate copies were" in caplog.text
    assert [Path(p).name for p in cache.skipped.path] == ["9000_idx5_x251_y1_class0.png"]
    reason = cache.skipped.reason.iat[0]
    assert reason.count("not a decodable image") == 2 and "its copy" in reason and "IDC_regular_ps50_idx5" in reason


def test_a_corrupt_patch_under_the_default_root_is_read_from_the_top_level_copy(tmp_path: Path) -> None:
    """data.root defaults to the zip's IDC_regular_ps50_idx5/: its sibling tree one level up holds the copies."""
    good = np.full((50, 50, 3), 70, np.uint8)
    write(tmp_path / "9000/1/9000_idx5_x1_y1_class1.png", good)
    write(tmp_path / "9000/0/9000_idx5_x51_y1_class0.png", good)
    root = tmp_path / "IDC_regular_ps50_idx5"
    write(root / "9000/0/9000_idx5_x51_y1_class0.png", good)
    (root / "9000/1").mkdir(parents=True)
    (root / "9000/1/9000_idx5_x1_y1_class1.png").write_bytes(b"truncated")
    manifest, _ = scan_tree(root)
    assert sorted(manifest.copy_path) == ["../9000/0/9000_idx5_x51_y1_class0.png",
                                          "../9000/1/9000_idx5_x1_y1_class1.png"]
    cache = build_cache(manifest, root, tmp_path / "cache", workers=1)
    assert cache.skipped.empty and all(np.array_equal(image, good) for image in cache.images)


def test_cache_key_follows_stain_normalisation(odd_tree: Path, tmp_path: Path) -> None:
    manifest, _ = scan_tree(odd_tree)
    plain = build_cache(manifest, odd_tree, tmp_path / "cache", workers=1)
    stained = build_cache(manifest, odd_tree, tmp_path / "cache", stain_norm="macenko", workers=1)
    assert plain.folder != stained.folder
    with pytest.raises(ValueError, match="stain_norm"):
        build_cache(manifest, odd_tree, tmp_path / "cache", stain_norm="reinhard")


def test_parallel_build_matches_serial_on_real_patches(real_data: Path, tmp_path: Path) -> None:
    manifest, _ = scan_tree(real_data)
    manifest = manifest[manifest.patient_id.isin(["8864", "9035"])].reset_index(drop=True)
    serial = build_cache(manifest, real_data, tmp_path / "a", workers=1)
    parallel = build_cache(manifest, real_data, tmp_path / "b", workers=2)
    assert np.array_equal(np.asarray(serial.images), np.asarray(parallel.images))
    assert len(serial.skipped) == 0
    path = real_data / manifest.path[0]
    expected = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    h, w = expected.shape[:2]
    assert np.array_equal(serial.images[0][:h, :w], expected)


def test_files_rewritten_under_the_same_names_are_packed_again(odd_tree: Path, tmp_path: Path) -> None:
    """Regenerated slides or a re-unzipped download keep their names: the cache must not serve the old pixels."""
    manifest, _ = build_manifest(odd_tree, tmp_path / "cache")
    first = build_cache(manifest, odd_tree, tmp_path / "cache", workers=1)
    patch = odd_tree / "9000/0/9000_idx5_x1_y1_class0.png"
    patch.unlink()
    write(patch, np.full((50, 50, 3), 30, np.uint8))
    manifest, _ = build_manifest(odd_tree, tmp_path / "cache")
    again = build_cache(manifest, odd_tree, tmp_path / "cache", workers=1)
    assert again.folder != first.folder
    index = again.rows.set_index("x").loc[1, "cache_index"]
    assert tuple(again.images[index][0, 0]) == (30, 30, 30)


def test_a_patch_rewritten_in_place_is_packed_again(odd_tree: Path, tmp_path: Path) -> None:
    """Overwriting a PNG (same name, same inode) leaves its folder's mtime alone; its own size and mtime change."""
    cache_dir = tmp_path / "cache"
    manifest, _ = build_manifest(odd_tree, cache_dir)
    first = build_cache(manifest, odd_tree, cache_dir, workers=1)
    patch = odd_tree / "9000/0/9000_idx5_x1_y1_class0.png"
    folder_mtime = patch.parent.stat().st_mtime_ns
    noise = np.random.default_rng(0).integers(0, 256, (50, 50, 3), dtype=np.uint8)
    Image.fromarray(noise).save(patch)
    assert patch.parent.stat().st_mtime_ns == folder_mtime
    manifest, _ = build_manifest(odd_tree, cache_dir)
    again = build_cache(manifest, odd_tree, cache_dir, workers=1)
    assert again.folder != first.folder
    index = again.rows.set_index("x").loc[1, "cache_index"]
    assert np.array_equal(again.images[index], noise)
    unchanged, _ = build_manifest(odd_tree, cache_dir)
    assert build_cache(unchanged, odd_tree, cache_dir, workers=1).folder == again.folder


def test_cache_inside_the_data_root_is_reused_and_not_scanned(odd_tree: Path) -> None:
    cache_dir = odd_tree / "cache"
    manifest, report = build_manifest(odd_tree, cache_dir)
    cache = build_cache(manifest, odd_tree, cache_dir, workers=1)
    manifest_again, report_again = build_manifest(odd_tree, cache_dir)
    assert manifest_again.equals(manifest) and report_again.ignored == report.ignored == []
    assert build_cache(manifest_again, odd_tree, cache_dir, workers=1).folder == cache.folder


def test_a_read_only_cache_dir_names_the_setting_and_a_saved_cache_is_still_reused(
    odd_tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_dir = odd_tree / "cache"  # the default: inside the data folder
    manifest, _ = build_manifest(odd_tree, cache_dir)
    packed = build_cache(manifest, odd_tree, cache_dir, workers=1)
    make_dir = Path.mkdir

    def read_only_mount(self: Path, *args, **kwargs) -> None:
        # Root ignores permission bits, so the read-only mount is the one filesystem call that fails.
        if self == cache_dir or cache_dir in self.parents:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        make_dir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only_mount)
    again, _ = build_manifest(odd_tree, cache_dir)
    assert np.array_equal(build_cache(again, odd_tree, cache_dir, workers=1).images, packed.images)
    write(odd_tree / "9000/0/9000_idx5_x301_y1_class0.png", np.zeros((50, 50, 3), np.uint8))
    with pytest.raises(CacheDirNotWritableError, match=rf"cache folder {cache_dir} .*paths.cache_dir=.*IDC_CACHE_DIR"):
        build_manifest(odd_tree, cache_dir)
    with pytest.raises(CacheDirNotWritableError, match="Read-only file system"):
        build_cache(scan_tree(odd_tree, exclude=cache_dir)[0], odd_tree, cache_dir, workers=1)


def test_a_file_that_cannot_be_read_stops_the_build_by_name_and_nothing_is_cached(
    odd_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest, _ = scan_tree(odd_tree)
    locked = str(odd_tree / "9000/0/9000_idx5_x1_y1_class0.png")
    fromfile = np.fromfile

    def refuse_locked(path: str, *args: object, **kwargs: object) -> np.ndarray:
        if str(path) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", locked)
        return fromfile(path, *args, **kwargs)

    monkeypatch.setattr(np, "fromfile", refuse_locked)  # as root, chmod 000 does not stop a read
    with pytest.raises(PatchReadError, match="1 patch files could not be read") as refused:
        build_cache(manifest, odd_tree, tmp_path / "cache", workers=1)
    assert "9000/0/9000_idx5_x1_y1_class0.png: [Errno 13] Permission denied" in str(refused.value)
    assert "Fix their permissions" in str(refused.value)
    assert not list((tmp_path / "cache" / "patches").iterdir())
    # Once it can be read (same size and mtime: the same cache key), the patch is packed, not skipped.
    monkeypatch.setattr(np, "fromfile", fromfile)
    cache = build_cache(manifest, odd_tree, tmp_path / "cache", workers=1)
    assert locked.endswith(cache.rows.path.iat[0]) and len(cache.skipped) == 2


def test_a_corrupt_patch_whose_copy_is_gone_is_skipped_with_both_reasons(tmp_path: Path) -> None:
    root = tmp_path / "IDC_regular_ps50_idx5"
    write(tmp_path / "9000/1/9000_idx5_x1_y1_class1.png", np.full((50, 50, 3), 70, np.uint8))
    (root / "9000/1").mkdir(parents=True)
    (root / "9000/1/9000_idx5_x1_y1_class1.png").write_bytes(b"truncated")
    write(root / "9000/0/9000_idx5_x51_y1_class0.png", np.full((50, 50, 3), 70, np.uint8))
    manifest, _ = scan_tree(root)
    (tmp_path / "9000/1/9000_idx5_x1_y1_class1.png").unlink()  # the upper tree deleted after the scan
    cache = build_cache(manifest, root, tmp_path / "cache", workers=1)
    (reason,) = cache.skipped["reason"]
    assert "corrupt or truncated" in reason and "No such file or directory" in reason


def test_a_cache_another_node_published_first_is_kept(tmp_path: Path) -> None:
    """Nodes sharing paths.cache_dir pack the same cache at once: the loser's rename fails and its copy goes."""
    folder, ours = tmp_path / "abc", tmp_path / "abc.partial-node2-7"
    for packed, who in ((folder, "node1"), (ours, "node2")):
        packed.mkdir()
        (packed / "meta.json").write_text(who)
    _publish(ours, folder)
    assert (folder / "meta.json").read_text() == "node1" and not ours.exists()
    (folder / "meta.json").unlink()
    (folder / "stray").write_text("")
    ours.mkdir()
    (ours / "meta.json").write_text("node2")
    with pytest.raises(OSError):  # a folder in the way that is no finished cache is not silently replaced
        _publish(ours, folder)
