"""Index a Kaggle-layout IDC tree into a pandas manifest: one row per unique patch, no image decoding."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from idc_lightning.data.cache_dir import writing_to
from idc_lightning.data.progress import progress_bar

log = logging.getLogger(__name__)

KAGGLE_DATASET_ID = "paultimothymooney/breast-histopathology-images"
# New, unlabelled slides for predict may drop the class suffix: their label is UNLABELLED, unless the file lies in
# the Kaggle class folder <pid>/<0|1>/.
PATCH_NAME = re.compile(
    r"^(?P<pid>[^_/]+)_idx5_x(?P<x>\d+)_y(?P<y>\d+)(?:_class(?P<label>[01]))?\.png$", re.IGNORECASE
)
UNLABELLED = -1
CLASS_FOLDERS = ("0", "1")
# size and mtime_ns say which version of the file the row describes: a cache keyed on them sees rewrites.
MANIFEST_COLUMNS = ["patient_id", "x", "y", "label", "path", "size", "mtime_ns"]
# Bump when the saved manifest's columns or parsing rules change, so manifests saved by an older version are rescanned.
MANIFEST_FORMAT = 5
# The zip repeats the whole tree under this folder: the same files twice.
DUPLICATE_TREE = "IDC_regular_ps50_idx5"
# How deep patch files lie below the zip's top level: IDC_regular_ps50_idx5/<patient_id>/<class>/<patch>.png
KAGGLE_DEPTH = 4


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
    # Entries the walk could not read or follow (a folder without permission, a broken link, a non-UTF-8 name).
    unread: list[dict[str, str]] = field(default_factory=list)
    # Patches kept under the patient id of their name although they lie in another patient's folder.
    misplaced: list[dict[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.patches} patches of {self.patients} patients from {self.files_seen} files under {self.root}; "
            f"{self.duplicates} duplicate copies merged, {len(self.skipped)} skipped by name or folder, "
            f"{len(self.ignored)} non-patch files ignored, {len(self.unread)} files or folders not read, "
            f"{len(self.misplaced)} in another patient's folder"
        )


def missing_data_message(root: Path, problem: str) -> str:
    return (
        f"{problem}: {root}\n"
        f"Expected the Kaggle dataset '{KAGGLE_DATASET_ID}' unzipped there, laid out as\n"
        f"  <root>/<patient_id>/<0|1>/<patient_id>_idx5_x<X>_y<Y>_class<0|1>.png\n"
        f"Download it (kaggle datasets download -d {KAGGLE_DATASET_ID}; unzip) and set data.root=PATH, "
        f"or run offline on generated slides with data=synthetic."
    )


# (relative dir, file name, st_size, st_mtime_ns): a plain tuple, as a NamedTuple costs 0.25 s per 284k files.
TreeFile = tuple[str, str, int, int]


@dataclass
class TreeListing:
    """What a walk found: the files it can read, and each entry it could not, with the reason and what to do."""

    files: list[TreeFile] = field(default_factory=list)
    unread: list[dict[str, str]] = field(default_factory=list)

    def not_read(self, rel_path: str, reason: str) -> None:
        self.unread.append({"path": printable(rel_path), "reason": reason})


def printable(path: str) -> str:
    """The path with any byte that is not UTF-8 shown as U+FFFD: such names cannot be written to CSV or parquet."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _walk_files(root: Path, exclude: Path | str | None = None) -> TreeListing:
    """Every file under root, except inside `exclude`; os.scandir's entries make the stat about 3 µs a file."""
    excluded = _excluded_folder(exclude)
    listing = TreeListing()
    stack = [""]
    seen: set[tuple[int, int]] = set()
    with progress_bar(f"Scanning {root}", total=None) as advance:
        while stack:
            rel_dir = stack.pop()
            before = len(listing.files)
            try:
                if not _first_visit(root / rel_dir, seen):
                    continue
                with os.scandir(root / rel_dir) as entries:
                    for entry in entries:
                        _list_entry(entry, rel_dir, excluded, stack, listing)
            except OSError as error:
                listing.not_read(rel_dir or ".", f"folder could not be read ({error.strerror}): fix its "
                                                  "permissions, or move it out of data.root")
            advance(len(listing.files) - before)
    return listing


def _list_entry(entry: os.DirEntry, rel_dir: str, excluded: str | None, stack: list[str],
                listing: TreeListing) -> None:
    """A file into the listing, a folder onto the stack, anything else listed as not read with what to do; an
    entry that cannot be followed (a link loop) is listed alone, the rest of its folder is still read."""
    rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
    try:
        if not _is_utf8(entry.name):
            listing.not_read(rel, "the name is not valid UTF-8: rename it (a folder's files are not read either)")
        elif entry.is_dir(follow_symlinks=True):
            if not _is_excluded(entry.path, excluded):
                stack.append(rel)
        elif entry.is_file(follow_symlinks=True):
            stat = entry.stat(follow_symlinks=True)
            listing.files.append((rel_dir, entry.name, stat.st_size, stat.st_mtime_ns))
        elif entry.is_symlink():
            listing.not_read(rel, f"broken symbolic link to {printable(os.readlink(entry.path))}: restore its "
                                  "target, or remove the link")
        else:
            listing.not_read(rel, "not a regular file (a device, pipe or socket)")
    except OSError as error:
        listing.not_read(rel, f"could not be followed ({error.strerror}): repair or remove it")


def holds_patches(folder: Path) -> bool:
    """Whether a Kaggle-named patch lies in folder or below, down to the zip's depth (KAGGLE_DEPTH); stops at the
    first one, so a slide archive is not walked to the bottom."""
    level: list[str] = [str(folder)]
    seen: set[tuple[int, int]] = set()
    for _ in range(KAGGLE_DEPTH + 1):
        below: list[str] = []
        for directory in level:
            try:
                if not _first_visit(directory, seen):
                    continue
                with os.scandir(directory) as entries:
                    for entry in entries:
                        if _is_patch_or_folder(entry, below):
                            return True
            except OSError:
                continue  # unreadable: the manifest scan lists it as not read
        level = below
    return False


def _is_patch_or_folder(entry: os.DirEntry, folders: list[str]) -> bool:
    """True for a patch file; a folder goes into `folders`; an entry that cannot be followed is passed over."""
    try:
        if entry.is_dir(follow_symlinks=True):
            folders.append(entry.path)
            return False
        return bool(PATCH_NAME.match(entry.name)) and entry.is_file(follow_symlinks=True)
    except OSError:
        return False


def _first_visit(directory: Path | str, seen: set[tuple[int, int]]) -> bool:
    """Records the directory (by device and inode): a symlink back up the tree is walked once, not forever."""
    stat = os.stat(directory)
    key = (stat.st_dev, stat.st_ino)
    if key in seen:
        return False
    seen.add(key)
    return True


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
    return _parse_files(root, _walk_files(root, exclude))


def _parse_files(root: Path, listing: TreeListing) -> tuple[pd.DataFrame, ManifestReport]:
    report = ManifestReport(root=str(root), unread=list(listing.unread))
    rows: list[tuple[str, int, int, int, str, int, int]] = []
    in_other_folder: list[tuple[str, str, str]] = []  # (path, patient id of the name, patient folder)
    for rel_dir, name, size, mtime_ns in listing.files:
        report.files_seen += 1
        rel_path = f"{rel_dir}/{name}" if rel_dir else name
        match = PATCH_NAME.match(name)
        if match is None:
            report.ignored.append(rel_path)
            continue
        label = UNLABELLED if match["label"] is None else int(match["label"])
        parents = [root.name, *rel_dir.split("/")] if rel_dir else [root.name]
        folder = parents[-1] if rel_dir else ""
        if label == UNLABELLED and folder in CLASS_FOLDERS and parents[-2] == match["pid"]:
            label = int(folder)  # <pid>/<0|1>/ without the class suffix: the Kaggle class folder is the label
        # Only a class folder can contradict the name: loose labelled patches keep the name's label.
        if label != UNLABELLED and folder in CLASS_FOLDERS and folder != str(label):
            report.skipped.append(
                {"path": rel_path, "reason": f"class{label} in the file name but stored in folder '{folder}'"}
            )
            continue
        patient_folder = parents[-2] if folder in CLASS_FOLDERS else folder
        if patient_folder != match["pid"]:
            in_other_folder.append((rel_path, match["pid"], patient_folder))
        rows.append((match["pid"], int(match["x"]), int(match["y"]), label, rel_path, size, mtime_ns))
    frame = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    frame = _copies_in_the_sibling_tree(_merge_duplicate_copies(frame, report), root)
    report.misplaced = _misplaced(in_other_folder, frame)
    if frame.empty:
        problem = (f"no IDC patch files found under data.root ({report.files_seen} files seen, "
                   f"{len(report.ignored)} without a patch name, {len(report.skipped)} skipped")
        if report.unread:
            problem += f"; {len(report.unread)} not read, e.g. {report.unread[0]['path']}: {report.unread[0]['reason']}"
        raise DatasetNotFoundError(missing_data_message(root, problem + ")"))
    frame = frame.astype({"patient_id": str, "x": "int32", "y": "int32", "label": "int8", "path": str,
                          "size": "int64", "mtime_ns": "int64", "copy_path": str})
    frame = frame.sort_values(["patient_id", "y", "x"], ignore_index=True)
    report.patches = len(frame)
    report.patients = frame["patient_id"].nunique()
    return frame, report


def _misplaced(in_other_folder: list[tuple[str, str, str]], kept: pd.DataFrame) -> list[dict[str, str]]:
    """Kept patches in a folder named after another patient of the tree: the file name, which also carries the
    label, decides, so a patch copied into the wrong folder still trains and is tested with its own slide. A folder
    that is no patient's (a user's own layout) is not a misplacement; a merged duplicate copy is not listed twice."""
    patient_ids, kept_paths = set(kept["patient_id"]), set(kept["path"])
    return [{"path": path, "reason": f"patient {pid} in the file name, stored in patient {folder}'s folder: kept as "
                                     f"patient {pid}"}
            for path, pid, folder in in_other_folder if folder in patient_ids and path in kept_paths]


def _merge_duplicate_copies(frame: pd.DataFrame, report: ManifestReport) -> pd.DataFrame:
    """Keep one file per (patient, x, y), and another copy of it in `copy_path` ("" if none) for the cache to
    read when the kept one is corrupt; a patch labelled both ways is skipped, never guessed."""
    frame = frame.assign(depth=frame["path"].str.count("/")).sort_values(["depth", "path"], kind="stable")
    key = ["patient_id", "x", "y"]
    conflicting = frame.groupby(key)["label"].transform("nunique") > 1
    for path in frame.loc[conflicting, "path"]:
        report.skipped.append({"path": path, "reason": "the same patient/x/y exists with both class labels"})
    frame = frame[~conflicting]
    copies = frame[frame.duplicated(key, keep="first")].drop_duplicates(key)[[*key, "path"]]
    unique = frame.drop_duplicates(key, keep="first")
    report.duplicates = len(frame) - len(unique)
    unique = unique.merge(copies.rename(columns={"path": "copy_path"}), on=key, how="left")
    return unique.assign(copy_path=unique["copy_path"].fillna("")).drop(columns="depth")


def _copies_in_the_sibling_tree(frame: pd.DataFrame, root: Path) -> pd.DataFrame:
    """With data.root at the zip's IDC_regular_ps50_idx5/ (the default), the same files also lie one level up:
    those become the copies the cache reads when a file here is corrupt."""
    if root.name != DUPLICATE_TREE or frame.empty:
        return frame
    # Checked per row (one stat each, on the first scan only): a patient may be missing from the upper tree.
    upper = np.fromiter(((root.parent / path).is_file() for path in frame["path"]), dtype=bool, count=len(frame))
    alone = (frame["copy_path"] == "").to_numpy() & upper
    return frame.assign(copy_path=frame["copy_path"].where(~alone, "../" + frame["path"]))


def files_signature(root: Path, listing: TreeListing) -> str:
    """Hash of every file's path, size and mtime, and of what was not read: adding, removing, renaming or rewriting
    a file changes it, and so does repairing a folder's permissions or a broken link.

    Folder mtimes alone miss a file rewritten in place under its old name (regenerated slides).
    """
    digest = hashlib.sha1(f"{MANIFEST_FORMAT}|{Path(root).resolve()}".encode())
    lines = (f"{rel_dir}/{name}\0{size}\0{mtime_ns}\n" for rel_dir, name, size, mtime_ns in listing.files)
    digest.update("".join(lines).encode())
    digest.update(json.dumps(listing.unread).encode())
    return digest.hexdigest()[:16]


def build_manifest(root: Path | str, cache_dir: Path | str | None = None) -> tuple[pd.DataFrame, ManifestReport]:
    """Scan root, or reuse the parquet saved in cache_dir for a tree whose files are all unchanged.

    The reuse check stats every file (about 1 s per 280k files with a warm cache; the full download holds each
    patch twice), so only the name parsing is saved. Rows keep each file's size and mtime_ns, which the patch
    cache's key hashes.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError(missing_data_message(root, "data.root does not exist or is not a folder"))
    if cache_dir is None:
        return scan_tree(root)
    listing = _walk_files(root, exclude=cache_dir)
    saved = Path(cache_dir) / "manifests" / files_signature(root, listing)
    if (saved / "manifest.parquet").is_file() and (saved / "report.json").is_file():
        report = ManifestReport(**json.loads((saved / "report.json").read_text()))
        log.info("Reusing manifest %s", saved)
        return pd.read_parquet(saved / "manifest.parquet"), report
    frame, report = _parse_files(root, listing)
    with writing_to(cache_dir):
        saved.mkdir(parents=True, exist_ok=True)
        # Each file is written under a name of this process's and renamed into place (nodes sharing cache_dir may
        # save the same manifest at once); the report comes last: its presence marks a complete manifest.
        partial = f".{socket.gethostname()}-{os.getpid()}.tmp"
        frame.to_parquet(saved / f"manifest.parquet{partial}", index=False)
        (saved / f"manifest.parquet{partial}").replace(saved / "manifest.parquet")
        (saved / f"report.json{partial}").write_text(json.dumps(asdict(report), indent=1))
        (saved / f"report.json{partial}").replace(saved / "report.json")
    return frame, report
