from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from idc_lightning.data.manifest import DatasetNotFoundError, build_manifest, holds_patches, scan_tree


def write_patch(root: Path, pid: str, x: int, y: int, label: int, folder: str | None = None,
                size: tuple[int, int] = (50, 50)) -> Path:
    path = root / pid / (folder if folder is not None else str(label)) / f"{pid}_idx5_x{x}_y{y}_class{label}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((*size, 3), 180 + label * 40, np.uint8))
    return path


def test_parses_names_at_any_depth_and_merges_the_duplicated_tree(tmp_path: Path) -> None:
    for root in (tmp_path, tmp_path / "IDC_regular_ps50_idx5"):
        write_patch(root, "10253", 1, 1, 0)
        write_patch(root, "10253", 501, 101, 1)
        write_patch(root, "8863", 51, 1, 0)
    frame, report = scan_tree(tmp_path)
    assert len(frame) == 3 and report.duplicates == 3 and report.files_seen == 6
    assert report.patients == 2
    row = frame[(frame.patient_id == "10253") & (frame.label == 1)].iloc[0]
    assert (row.x, row.y) == (501, 101)
    assert row.path == "10253/1/10253_idx5_x501_y101_class1.png"  # the shallower copy wins
    assert row.copy_path == "IDC_regular_ps50_idx5/10253/1/10253_idx5_x501_y101_class1.png"  # read if it is corrupt
    assert list(frame.columns) == ["patient_id", "x", "y", "label", "path", "size", "mtime_ns", "copy_path"]
    assert row["size"] == (tmp_path / row.path).stat().st_size


def test_junk_is_counted_and_class_mismatch_is_skipped_with_a_reason(tmp_path: Path) -> None:
    write_patch(tmp_path, "9000", 1, 1, 1)
    write_patch(tmp_path, "9000", 51, 1, 1, folder="0")
    write_patch(tmp_path, "9000", 101, 1, 1, folder="new_patches")  # no class folder: the name's label holds
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "9000" / "notes.txt").write_text("slide scanned twice")
    frame, report = scan_tree(tmp_path)
    assert frame[["x", "label"]].values.tolist() == [[1, 1], [101, 1]]
    assert sorted(report.ignored) == [".DS_Store", "9000/notes.txt"]
    assert report.skipped[0]["path"].endswith("x51_y1_class1.png")
    assert "folder '0'" in report.skipped[0]["reason"]


def test_a_patch_in_another_patients_folder_counts_for_its_own_patient_and_is_listed(tmp_path: Path) -> None:
    for root in (tmp_path, tmp_path / "IDC_regular_ps50_idx5"):  # the zip's two trees: one patch, listed once
        write_patch(root, "9000", 1, 1, 0)
        write_patch(root, "9001", 1, 1, 1)
        moved = write_patch(root, "9001", 51, 1, 1)
        (root / "9000" / "1").mkdir()
        moved.rename(root / "9000" / "1" / moved.name)
    both_labels = write_patch(tmp_path, "9001", 101, 1, 1)
    (tmp_path / "9000" / "0").joinpath("9001_idx5_x101_y1_class0.png").write_bytes(both_labels.read_bytes())
    write_patch(tmp_path / "mine", "9002", 1, 1, 0).rename(tmp_path / "mine" / "9002_idx5_x1_y1_class0.png")
    frame, report = scan_tree(tmp_path)
    assert frame.groupby("patient_id").size().to_dict() == {"9000": 1, "9001": 2, "9002": 1}
    assert [entry["path"] for entry in report.misplaced] == ["9000/1/9001_idx5_x51_y1_class1.png"]
    assert "patient 9001 in the file name, stored in patient 9000's folder" in report.misplaced[0]["reason"]
    assert "1 in another patient's folder" in report.summary()


def test_missing_and_empty_roots_name_the_path_and_the_way_out(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="paultimothymooney/breast-histopathology-images") as missing:
        build_manifest(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(missing.value) and "data=synthetic" in str(missing.value)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x")
    with pytest.raises(DatasetNotFoundError, match="no IDC patch files"):
        build_manifest(tmp_path / "empty")


def test_manifest_is_cached_and_rebuilt_when_the_tree_changes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write_patch(root, "9000", 1, 1, 0)
    first, _ = build_manifest(root, tmp_path / "cache")
    assert len(list((tmp_path / "cache" / "manifests").iterdir())) == 1
    again, _ = build_manifest(root, tmp_path / "cache")
    assert again.equals(first)
    write_patch(root, "9000", 51, 1, 1)
    changed, report = build_manifest(root, tmp_path / "cache")
    assert len(changed) == 2 and report.patches == 2


def test_real_sample_indexes_every_patch(real_data: Path) -> None:
    """The counts its README.md gives: 25 patients, 22,726 patches, 5,041 of them IDC."""
    frame, report = scan_tree(real_data)
    assert len(frame) == 22_726 and report.patients == 25
    assert frame.label.sum() == 5_041
    assert report.ignored == ["README.md"] and not report.skipped


def test_saved_manifest_is_not_reused_when_a_patch_is_rewritten_in_place(tmp_path: Path) -> None:
    root = tmp_path / "root"
    path = write_patch(root, "9000", 1, 1, 0)
    first, _ = build_manifest(root, tmp_path / "cache")
    stat = path.stat()
    path.write_bytes(path.read_bytes())
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # the rewrite a second later
    again, _ = build_manifest(root, tmp_path / "cache")
    assert again.at[0, "mtime_ns"] == stat.st_mtime_ns + 1_000_000_000 != first.at[0, "mtime_ns"]
    assert len(list((tmp_path / "cache" / "manifests").iterdir())) == 2


def test_symlink_loops_are_walked_once(tmp_path: Path) -> None:
    write_patch(tmp_path / "data", "9000", 1, 1, 0)
    write_patch(tmp_path / "data", "9000", 51, 1, 1)
    (tmp_path / "data" / "9000" / "0" / "up").symlink_to(tmp_path / "data")
    (tmp_path / "data" / "9000" / "1" / "up").symlink_to(tmp_path / "data" / "9000")
    frame, report = scan_tree(tmp_path / "data")
    assert len(frame) == 2 and report.files_seen == 2
    slides = tmp_path / "slides"
    (slides / "case1_files").mkdir(parents=True)
    (slides / "case1.svs").write_bytes(b"II*\0")
    (slides / "case1_files" / "loop").symlink_to(slides)
    (slides / "case1_files" / "loop2").symlink_to(slides / "case1_files")
    assert not holds_patches(slides)
    assert holds_patches(tmp_path / "data") and holds_patches(tmp_path)


def test_what_the_walk_cannot_read_is_listed_and_the_rest_is_used(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    write_patch(tmp_path, "9000", 1, 1, 0)
    write_patch(tmp_path, "9001", 1, 1, 1)
    write_patch(tmp_path, "9002", 1, 1, 1)
    with open(os.path.join(os.fsencode(tmp_path), b"notes_\xe9t\xe9.txt"), "wb") as stray:  # Latin-1 bytes
        stray.write(b"x")
    os.mkdir(os.path.join(os.fsencode(tmp_path / "9000"), b"r\xe9sum\xe9"))
    (tmp_path / "9000" / "0" / "9000_idx5_x51_y1_class0.png").symlink_to(tmp_path / "gone.png")
    loop = tmp_path / "9001" / "1"
    (loop / "a.png").symlink_to(loop / "b.png")
    (loop / "b.png").symlink_to(loop / "a.png")
    write_patch(tmp_path, "9003", 1, 1, 0)
    locked, unsearchable = tmp_path / "9002" / "1", tmp_path / "9003" / "0"
    scandir, stat = os.scandir, os.stat

    def refuse_locked(path: os.PathLike | str = ".") -> object:
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    def refuse_unsearchable(path: os.PathLike | str, *args: object, **kwargs: object) -> os.stat_result:
        if Path(path) == unsearchable:  # listed by its parent, but no stat inside it (mode r without x)
            raise PermissionError(13, "Permission denied", str(path))
        return stat(path, *args, **kwargs)

    # As root, chmod does not stop a read: the refusals are emulated.
    monkeypatch.setattr(os, "scandir", refuse_locked)
    monkeypatch.setattr(os, "stat", refuse_unsearchable)
    frame, report = build_manifest(tmp_path, tmp_path / "cache")
    assert sorted(frame.patient_id) == ["9000", "9001"]  # 9001's patch is kept beside the link loop
    reasons = {entry["path"]: entry["reason"] for entry in report.unread}
    assert sorted(reasons) == ["9000/0/9000_idx5_x51_y1_class0.png", "9000/r\ufffdsum\ufffd", "9001/1/a.png",
                               "9001/1/b.png", "9002/1", "9003/0", "notes_\ufffdt\ufffd.txt"]
    assert reasons["9002/1"].startswith("folder could not be read (Permission denied): fix its permissions")
    assert reasons["9003/0"].startswith("folder could not be read (Permission denied)")
    assert "Too many levels of symbolic links" in reasons["9001/1/a.png"]
    assert "broken symbolic link" in reasons["9000/0/9000_idx5_x51_y1_class0.png"]
    assert "not valid UTF-8: rename it" in reasons["notes_\ufffdt\ufffd.txt"]
    assert "7 files or folders not read" in report.summary()
    # Repairing the folders changes what the walk sees, so the saved manifest is not reused.
    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "stat", stat)
    repaired, _ = build_manifest(tmp_path, tmp_path / "cache")
    assert sorted(repaired.patient_id) == ["9000", "9001", "9002", "9003"]


def test_a_root_holding_only_unreadable_entries_says_so(tmp_path: Path) -> None:
    (tmp_path / "9000_idx5_x1_y1_class0.png").symlink_to(tmp_path / "gone.png")
    with pytest.raises(DatasetNotFoundError, match=r"0 files seen, .*1 not read, e\.g\. .*broken symbolic link"):
        scan_tree(tmp_path)


def test_a_name_without_its_class_takes_the_class_folder_as_label(tmp_path: Path) -> None:
    write_patch(tmp_path, "9000", 1, 1, 0)
    unnamed = write_patch(tmp_path, "9000", 51, 1, 1)
    unnamed.rename(unnamed.with_name("9000_idx5_x51_y1.png"))
    loose = write_patch(tmp_path, "9000", 101, 1, 1, folder="new")
    loose.rename(loose.with_name("9000_idx5_x101_y1.png"))
    batch = tmp_path / "new_slides" / "1" / "9000_idx5_x151_y1.png"  # a numbered folder, not <pid>/<class>
    batch.parent.mkdir(parents=True)
    batch.hardlink_to(loose.with_name("9000_idx5_x101_y1.png"))
    frame, _ = scan_tree(tmp_path)
    assert frame[["x", "label"]].values.tolist() == [[1, 0], [51, 1], [101, -1], [151, -1]]
    one_patient, _ = scan_tree(tmp_path / "9000")  # data.root at the patient folder: its name is the pid
    assert one_patient[["x", "label"]].values.tolist() == [[1, 0], [51, 1], [101, -1]]


def test_only_patches_present_in_the_upper_tree_get_it_as_their_copy(tmp_path: Path) -> None:
    root = tmp_path / "IDC_regular_ps50_idx5"
    for tree in (tmp_path, root):
        write_patch(tree, "9000", 1, 1, 0)
    write_patch(root, "9083", 1, 1, 1)  # this patient is missing from the upper tree
    frame, _ = scan_tree(root)
    assert dict(zip(frame.patient_id, frame.copy_path, strict=True)) == {
        "9000": "../9000/0/9000_idx5_x1_y1_class0.png", "9083": ""}
