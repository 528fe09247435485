"""The folder where manifests and packed caches are written (paths.cache_dir), created with an error a user can act on.

Its default lies inside the data folder, which is often a read-only dataset mount; a cache that already exists there
is still reused, so only a first write needs the folder to be writable.
"""

from __future__ import annotations

import errno
from pathlib import Path

NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


class CacheDirNotWritableError(PermissionError):
    """paths.cache_dir cannot be written to."""


def make_cache_folder(folder: Path, cache_dir: Path | str) -> None:
    """mkdir -p `folder` (inside `cache_dir`), turning a permission error into what to set instead."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        if error.errno not in NOT_WRITABLE:
            raise
        raise CacheDirNotWritableError(
            error.errno,
            f"cannot write to paths.cache_dir={cache_dir} ({error.strerror}: {error.filename}). The scan's manifest "
            "and the packed patches are saved there, by default inside the data folder; point it at a writable "
            "folder: paths.cache_dir=/scratch/idc_cache, or IDC_CACHE_DIR=/scratch/idc_cache",
        ) from error
