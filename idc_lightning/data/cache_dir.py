"""Writing to the folder of manifests and packed caches (paths.cache_dir), with an error a user can act on.

Its default lies inside the data folder, which is often a read-only dataset mount; a cache that already exists there
is still reused, so only a first write needs the folder to be writable.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


class CacheDirNotWritableError(PermissionError):
    """paths.cache_dir cannot be written to."""


@contextmanager
def writing_to(cache_dir: Path | str) -> Iterator[None]:
    """Around the first writes of a manifest or a cache: a permission error becomes what to set instead."""
    try:
        yield
    except OSError as error:
        if error.errno not in NOT_WRITABLE:
            raise
        raise CacheDirNotWritableError(
            error.errno,
            f"cannot write to the cache folder {cache_dir} ({error.strerror}: {error.filename}). The scan's manifest "
            "and the packed patches are saved there, by default inside the data folder; point it at a writable "
            "folder: paths.cache_dir=/scratch/idc_cache (or IDC_CACHE_DIR=/scratch/idc_cache; data.cache_dir where "
            "it was set on its own)",
        ) from error
