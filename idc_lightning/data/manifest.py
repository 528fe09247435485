"""Index a Kaggle-layout IDC tree into a pandas manifest: one row per unique patch, no image decoding."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)

KAGGLE_DATASET_ID = "paultimothymooney/breast-histopathology-images"
# New, unlabelled slides for predict may drop the class suffix: their label is UNLABELLED.
PATCH_NAME = re.compile(
    r"^(?P<pid>[^_/]+)_idx5_x(?P<x>\d+)_y(?P<y>\d+)(?:_class(?P<label>[01]))?\.png$", re.IGNORECASE
)
UNLABELLED = -1
MANIFEST_COLUMNS = ["patient_id", "x", "y", "label", "path"]
# The zip repeats the whole tree under this folder: the same files twice.
DUPLICATE_TREE = "IDC_regular_ps50_idx5"


class DatasetNotFoundError(FileNotFoundError):
    """The configured data root is missing or holds no IDC patches."""


@dataclass
class ManifestReport:
    """What the scan saw besides the patches it kept, so nothing is dropped silently."""

    root: str
    files_seen: int = 0
    patches: int = 0
    patients: int = 0
    duplicates: int = 0
    ignored: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.patches} patches of {self.patients} patients from {self.files_seen} files under {self.root}; "
            f"{self.duplicates} duplicate copies merged, {len(self.skipped)} skipped, "
            f"{len(self.ignored)} non-patch files ignored"
        )


def missing_data_message(root: Path, problem: str) -> str:
    return (
        f"{problem}: {root}\n"
        f"Expected the Kaggle dataset '{KAGGLE_DATASET_ID}' unzipped there, laid out as\n"
        f"  <root>/<patient_id>/<0|1>/<patient_id>_idx5_x<X>_y<Y>_class<0|1>.png\n"
        f"Download it (kaggle datasets download -d {KAGGLE_DATASET_ID}; unzip) and set data.root=PATH, "
        f"or run offline on generated slides with data=synthetic."
    )


def _walk_files(root: Path, exclude: Path | None = None) -> list[tuple[str, str]]:
    """(relative dir, file name) for every file under root, except inside `exclude`, following os.scandir for speed."""
    excluded = _excluded_folder(exclude)
    found: list[tuple[str, str]] = []
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        with os.scandir(root / rel_dir) as entries:
            for entry in entries:
                rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                if entry.is_dir(follow_symlinks=True):
                    if not _is_excluded(entry.path, excluded):
                        stack.append(rel)
                elif entry.is_file(follow_symlinks=True):
                    found.append((rel_dir, entry.name))
    return found


def _excluded_folder(folder: Path | str | None) -> str | None:
    return None if folder is None else os.path.realpath(folder)


def _is_excluded(path: str, excluded: str | None) -> bool:
    return excluded is not None and os.path.realpath(path) == excluded


def scan_tree(root: Path, exclude: Path | str | None = None) -> tuple[pd.DataFrame, ManifestReport]:
    """Parse every patch file name under root; merge the zip's duplicated tree; report the rest.

    `exclude` is the cache folder when a user keeps it inside the data root (paths.cache_dir under data.root):
    the project's own files are neither patches nor strays.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError(missing_data_message(root, "data.root does not exist or is not a folder"))
    report = ManifestReport(root=str(root))
    rows: list[tuple[str, int, int, int, str]] = []
    for rel_dir, name in _walk_files(root, exclude):
        report.files_seen += 1
        rel_path = f"{rel_dir}/{name}" if rel_dir else name
        match = PATCH_NAME.match(name)
        if match is None:
            report.ignored.append(rel_path)
            continue
        label = UNLABELLED if match["label"] is None else int(match["label"])
        folder = rel_dir.rsplit("/", 1)[-1]
        if label != UNLABELLED and folder != str(label):
            report.skipped.append(
                {"path": rel_path, "reason": f"class{label} in the file name but stored in folder '{folder}'"}
            )
            continue
        rows.append((match["pid"], int(match["x"]), int(match["y"]), label, rel_path))
    frame = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    frame = _merge_duplicate_copies(frame, report)
    if frame.empty:
        raise DatasetNotFoundError(missing_data_message(root, "no IDC patch files found under data.root"))
    frame = frame.astype({"patient_id": str, "x": "int32", "y": "int32", "label": "int8", "path": str})
    frame = frame.sort_values(["patient_id", "y", "x"], ignore_index=True)
    report.patches = len(frame)
    report.patients = frame["patient_id"].nunique()
    return frame, report


def _merge_duplicate_copies(frame: pd.DataFrame, report: ManifestReport) -> pd.DataFrame:
    """Keep one file per (patient, x, y); a patch labelled both ways is skipped, never guessed."""
    frame = frame.assign(depth=frame["path"].str.count("/")).sort_values(["depth", "path"], kind="stable")
    key = ["patient_id", "x", "y"]
    conflicting = frame.groupby(key)["label"].transform("nunique") > 1
    for path in frame.loc[conflicting, "path"]:
        report.skipped.append({"path": path, "reason": "the same patient/x/y exists with both class labels"})
    frame = frame[~conflicting]
    unique = frame.drop_duplicates(key, keep="first")
    report.duplicates = len(frame) - len(unique)
    return unique.drop(columns="depth")


def tree_signature(root: Path, exclude: Path | str | None = None) -> str:
    """Hash of every folder's path and mtime: adding, removing or renaming a file changes its folder's mtime.

    The `exclude` folder (the cache, when it lives under root) is left out, or writing the cache would change it.
    """
    excluded = _excluded_folder(exclude)
    digest = hashlib.sha1(str(Path(root).resolve()).encode())
    stack = [Path(root)]
    while stack:
        folder = stack.pop()
        digest.update(f"{folder}:{folder.stat().st_mtime_ns}".encode())
        with os.scandir(folder) as entries:
            stack.extend(Path(entry.path) for entry in entries
                         if entry.is_dir(follow_symlinks=True) and not _is_excluded(entry.path, excluded))
    return digest.hexdigest()[:16]


def build_manifest(root: Path | str, cache_dir: Path | str | None = None) -> tuple[pd.DataFrame, ManifestReport]:
    """Scan root (or reuse the parquet saved for an unchanged tree in cache_dir)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError(missing_data_message(root, "data.root does not exist or is not a folder"))
    if cache_dir is None:
        return scan_tree(root)
    saved = Path(cache_dir) / "manifests" / tree_signature(root, exclude=cache_dir)
    if (saved / "manifest.parquet").is_file() and (saved / "report.json").is_file():
        report = ManifestReport(**json.loads((saved / "report.json").read_text()))
        log.info("Reusing manifest %s", saved)
        return pd.read_parquet(saved / "manifest.parquet"), report
    frame, report = scan_tree(root, exclude=cache_dir)
    saved.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(saved / "manifest.parquet", index=False)
    # The report is written last and atomically: its presence marks a complete manifest.
    partial = saved / "report.json.tmp"
    partial.write_text(json.dumps(asdict(report), indent=1))
    partial.replace(saved / "report.json")
    return frame, report
