"""Decode every patch PNG once into one uint8 memmap (N x 50 x 50 x 3), so epochs never touch PNGs again."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from idc_lightning.data.cache_dir import writing_to
from idc_lightning.data.progress import progress_bar
from idc_lightning.preprocessing import PAD_VALUE, PATCH_SIZE

log = logging.getLogger(__name__)

IMAGES_FILE = "images.u8"
# Bump when what a cache holds for the same input changes, so caches packed by an older version are rebuilt
# (2: a read error is no longer cached as a skipped patch; 3: rows record each file's height and width).
CACHE_FORMAT = 3
SKIPPED_FILE = "skipped.csv"


class PatchDecodeError(ValueError):
    """A patch file that cannot become a patch_size x patch_size RGB array."""


class PatchReadError(OSError):
    """Patch files the operating system would not read (permissions, I/O): not cached as skipped, since a fixed
    file keeps its size and mtime and a reused cache would skip it for ever."""


# (position in the manifest, error text) per patch: those that failed, or those read from a later copy.
RowErrors = list[tuple[int, str]]
# (position in the manifest, height, width) of each decoded file, before padding.
RowSizes = list[tuple[int, int, int]]
# Narrower or shorter than this, an edge patch is mostly padding: counted apart in the log.
SLIVER_PX = 10


@dataclass
class PatchCache:
    """The packed pixels plus the manifest rows they belong to (`cache_index` = row in `images`)."""

    images: np.ndarray
    rows: pd.DataFrame
    skipped: pd.DataFrame
    folder: Path


def decode_patch(path: Path | str, patch_size: int = PATCH_SIZE, pad_value: int = PAD_VALUE) -> np.ndarray:
    """RGB uint8 patch_size² array; slide-edge patches are padded bottom/right like glass background."""
    return pad_patch(read_rgb(path, pad_value), patch_size, pad_value)


def read_rgb(path: Path | str, pad_value: int = PAD_VALUE) -> np.ndarray:
    """The file's pixels as RGB uint8 at their own size; transparency is blended onto pad_value, like glass."""
    raw = np.fromfile(path, dtype=np.uint8)
    if not raw.size:
        raise PatchDecodeError("empty file (0 bytes): extract it from the zip again")
    image = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise PatchDecodeError(f"not a decodable image ({raw.size} bytes, corrupt or truncated): extract it from "
                               "the zip again")
    if image.dtype != np.uint8:
        image = (image // 257).astype(np.uint8) if image.dtype == np.uint16 else image.astype(np.uint8)
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    elif image.shape[2] == 4:
        alpha = image[:, :, 3:4].astype(np.float32) / 255.0
        rgb = cv2.cvtColor(image[:, :, :3], cv2.COLOR_BGR2RGB).astype(np.float32)
        image = np.rint(rgb * alpha + pad_value * (1.0 - alpha)).astype(np.uint8)
    else:
        image = cv2.cvtColor(image[:, :, :3], cv2.COLOR_BGR2RGB)
    return image


def pad_patch(image: np.ndarray, patch_size: int = PATCH_SIZE, pad_value: int = PAD_VALUE) -> np.ndarray:
    """A slide-edge patch (e.g. 50x35) grown to patch_size² at the bottom/right, where the slide's glass would be."""
    height, width = image.shape[:2]
    if height > patch_size or width > patch_size:
        raise PatchDecodeError(f"{width}x{height} px is larger than data.patch_size={patch_size}")
    if (height, width) != (patch_size, patch_size):
        padded = np.full((patch_size, patch_size, 3), pad_value, dtype=np.uint8)
        padded[:height, :width] = image
        image = padded
    return image


def cache_key(manifest: pd.DataFrame, patch_size: int, pad_value: int, stain_norm: str | None) -> str:
    """Changes whenever a row, a patch file's size or mtime, the patch geometry or the stain normalisation does.

    Files rewritten under the same names (regenerated slides, a re-unzipped download) keep their folders'
    mtimes but not their own, so the cache never serves the old pixels.
    """
    absent = [column for column in ("size", "mtime_ns", "copy_path") if column not in manifest.columns]
    if absent:
        raise ValueError(f"the manifest has no {absent} columns: build it with build_manifest or scan_tree")
    files = manifest[["path", "label", "size", "mtime_ns", "copy_path"]]
    digest = hashlib.sha1(pd.util.hash_pandas_object(files, index=False).values.tobytes())
    stain = f"{stain_norm}"
    if stain_norm:
        from idc_lightning.data.stain import STAIN_ESTIMATE_VERSION  # torch-free decode workers import this module

        stain += f"|v{STAIN_ESTIMATE_VERSION}"
    digest.update(f"{CACHE_FORMAT}|{patch_size}|{pad_value}|{stain}".encode())
    return digest.hexdigest()[:16]


def _decode_patient(
    images_path: str,
    shape: tuple[int, ...],
    positions: np.ndarray,
    paths: list[tuple[str, ...]],
    patch_size: int,
    pad_value: int,
    stain_norm: str | None,
) -> tuple[RowErrors, RowErrors, RowErrors, RowSizes]:
    """Decode one patient's patches into its rows of the memmap, each from the first of its copies that decodes.

    Returns the patches none of whose copies decode, those with a copy that could not be read at all, those read
    from a later copy, and the size of each decoded file.
    """
    cv2.setNumThreads(1)
    images = np.memmap(images_path, dtype=np.uint8, mode="r+", shape=shape)
    decoded, kept, failures, unread, from_copies, sizes = [], [], [], [], [], []
    for position, copies in zip(positions, paths, strict=True):
        errors, read_error = [], False
        for path in copies:
            try:
                image = read_rgb(path, pad_value)
                decoded.append(pad_patch(image, patch_size, pad_value))
                kept.append(position)
                sizes.append((int(position), *image.shape[:2]))
                break
            except (PatchDecodeError, OSError) as error:
                # A missing file is a stale manifest or copy path, not one the system refuses to read.
                read_error = read_error or (isinstance(error, OSError) and not isinstance(error, FileNotFoundError))
                errors.append(f"its copy {path}: {error}" if errors else str(error))
        else:
            (unread if read_error else failures).append((int(position), "; ".join(errors)))
        if errors and len(errors) < len(copies):
            from_copies.append((int(position), errors[0]))
    if decoded:
        batch = np.stack(decoded)
        if stain_norm == "macenko":
            from idc_lightning.data.stain import macenko_normalize

            batch = macenko_normalize(batch)
        images[np.asarray(kept)] = batch
    images.flush()
    return failures, unread, from_copies, sizes


def _load(folder: Path) -> PatchCache:
    meta = json.loads((folder / "meta.json").read_text())
    images = np.memmap(folder / IMAGES_FILE, dtype=np.uint8, mode="r", shape=tuple(meta["shape"]))
    rows = pd.read_parquet(folder / "rows.parquet")
    skipped = pd.read_csv(folder / SKIPPED_FILE, dtype=str, keep_default_na=False)
    return PatchCache(images=images, rows=rows, skipped=skipped, folder=folder)


def _copies(root: Path, rows: pd.DataFrame) -> list[tuple[str, ...]]:
    """Each row's file, then its duplicate copy where the download holds one (manifest `copy_path`)."""
    return [(str(root / path), str(root / copy)) if copy else (str(root / path),)
            for path, copy in zip(rows["path"], rows["copy_path"], strict=True)]


def cache_folder(cache_dir: Path | str, key: str) -> Path:
    return Path(cache_dir) / "patches" / key


def build_cache(
    manifest: pd.DataFrame,
    root: Path | str,
    cache_dir: Path | str,
    patch_size: int = PATCH_SIZE,
    pad_value: int = PAD_VALUE,
    stain_norm: str | None = None,
    workers: int | None = None,
) -> PatchCache:
    """Pack the manifest's patches into a memmap under cache_dir, or reuse the one packed for the same input.

    The manifest must be fresh (build_manifest): its rows' size and mtime_ns are what tells a rewritten file.

    Undecodable files are listed (path + error) in skipped.csv beside the cache; rows = cached + skipped.
    """
    if stain_norm not in (None, "macenko"):
        raise ValueError(f"data.stain_norm={stain_norm!r} is not supported; use null or macenko")
    key = cache_key(manifest, patch_size, pad_value, stain_norm)
    folder = cache_folder(cache_dir, key)
    if (folder / "meta.json").is_file():
        log.info("Reusing packed patch cache %s", folder)
        return _load(folder)
    started = time.perf_counter()
    # Unique per host and process: nodes sharing cache_dir may pack the same cache at once.
    partial = folder.with_name(f"{key}.partial-{socket.gethostname()}-{os.getpid()}")
    shape = (len(manifest), patch_size, patch_size, 3)
    with writing_to(cache_dir):
        partial.mkdir(parents=True, exist_ok=True)
        np.memmap(partial / IMAGES_FILE, dtype=np.uint8, mode="w+", shape=shape).flush()
    root = Path(root)
    tasks = [
        (str(partial / IMAGES_FILE), shape, group.index.to_numpy(), _copies(root, group))
        for _, group in manifest.reset_index(drop=True).groupby("patient_id", sort=False)
    ]
    workers = workers if workers is not None else (os.cpu_count() or 1)
    failures: RowErrors = []
    unread: RowErrors = []
    from_copies: RowErrors = []
    sizes: RowSizes = []

    def collect(result: tuple[RowErrors, RowErrors, RowErrors, RowSizes]) -> None:
        failures.extend(result[0])
        unread.extend(result[1])
        from_copies.extend(result[2])
        sizes.extend(result[3])

    with progress_bar(f"Packing patches into {folder}", total=len(manifest)) as advance:
        if workers <= 1 or len(manifest) < 500:
            for task in tasks:
                collect(_decode_patient(*task, patch_size, pad_value, stain_norm))
                advance(len(task[3]))
        else:
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
                futures = {pool.submit(_decode_patient, *task, patch_size, pad_value, stain_norm): len(task[3])
                           for task in tasks}
                for future in as_completed(futures):
                    collect(future.result())
                    advance(futures[future])
    if unread:
        shutil.rmtree(partial)
        raise PatchReadError(_unread_message(manifest, sorted(unread)))
    failed = dict(sorted(failures))  # row order, whichever worker finished first
    rows = _with_sizes(manifest.reset_index(drop=True).assign(cache_index=np.arange(len(manifest), dtype=np.int64)),
                       sizes)
    skipped = pd.DataFrame(
        {"path": [rows.at[i, "path"] for i in failed], "reason": list(failed.values())}, columns=["path", "reason"]
    )
    rows = rows.drop(index=list(failed)).reset_index(drop=True)
    rows.to_parquet(partial / "rows.parquet", index=False)
    skipped.to_csv(partial / SKIPPED_FILE, index=False)
    edge = rows[(rows["height"] < patch_size) | (rows["width"] < patch_size)]
    meta = {"shape": list(shape), "patch_size": patch_size, "pad_value": pad_value, "stain_norm": stain_norm,
            "cached": len(rows), "skipped": len(skipped), "padded": len(edge),
            "seconds": round(time.perf_counter() - started, 2)}
    (partial / "meta.json").write_text(json.dumps(meta, indent=1))
    _publish(partial, folder)
    log.info("Packed %d patches into %s in %.1f s", len(rows), folder, meta["seconds"])
    if len(edge):
        _log_padded(edge, patch_size, pad_value)
    if len(skipped):
        log.warning(
            "Skipped %d undecodable patch files (listed in %s), e.g. %s: %s",
            len(skipped), folder / SKIPPED_FILE, skipped.at[0, "path"], skipped.at[0, "reason"],
        )
    if from_copies:
        position, error = min(from_copies)
        log.warning("%d patch files could not be used, so their duplicate copies were, e.g. %s "
                    "(%s) from %s", len(from_copies), manifest["path"].iat[position], error,
                    manifest["copy_path"].iat[position])
    return _load(folder)


def _with_sizes(rows: pd.DataFrame, sizes: RowSizes) -> pd.DataFrame:
    """Each row's file height and width before padding (0 for a patch that did not decode)."""
    height = np.zeros(len(rows), dtype=np.int32)
    width = np.zeros(len(rows), dtype=np.int32)
    if sizes:
        positions, heights, widths = np.asarray(sizes, dtype=np.int64).T
        height[positions], width[positions] = heights, widths
    return rows.assign(height=height, width=width)


def _log_padded(edge: pd.DataFrame, patch_size: int, pad_value: int) -> None:
    """Slide-edge patches are kept (the download cuts them so), but a user should know how many are mostly glass."""
    slivers = edge[(edge["height"] < SLIVER_PX) | (edge["width"] < SLIVER_PX)]
    example = (slivers if len(slivers) else edge).iloc[0]
    log.info("Padded %d slide-edge patches smaller than %dx%d px with data.pad_value=%d, %d of them under %d px "
             "wide or high (mostly padding), e.g. %s (%dx%d px); each row's file size is in rows.parquet "
             "(height, width) to filter on", len(edge), patch_size, patch_size, pad_value, len(slivers), SLIVER_PX,
             example["path"], example["width"], example["height"])


def _publish(partial: Path, folder: Path) -> None:
    """Rename the packed folder into place; when another node or process got there first, keep theirs."""
    try:
        partial.rename(folder)
    except OSError:
        if not (folder / "meta.json").is_file():
            raise
        shutil.rmtree(partial)


def _unread_message(manifest: pd.DataFrame, unread: RowErrors, shown: int = 5) -> str:
    listed = "\n".join(f"  {manifest['path'].iat[position]}: {error}" for position, error in unread[:shown])
    more = f"\n  ... and {len(unread) - shown} more" if len(unread) > shown else ""
    return (f"{len(unread)} patch files could not be read:\n{listed}{more}\n"
            "Nothing was cached. Fix their permissions (or remove them from data.root) and run again.")
