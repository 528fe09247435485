"""Peak memory of a measurement, from Linux's /proc/PID/smaps_rollup, over this process and its DataLoader workers.

Pss_Anon is heap, decoded arrays and tensors (what a loader path really costs); the total PSS adds mapped files
(the memmap's page-cache pages, split between the processes that map them; reclaimable).
"""

from __future__ import annotations

import threading
from pathlib import Path

import psutil


class PeakMemory:
    """Samples `tree_memory_mib` in a thread; `peak` (MiB, per kind) after the `with`."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.peak = {"pss": 0.0, "pss_anon": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            for kind, mib in tree_memory_mib().items():
                self.peak[kind] = max(self.peak[kind], mib)
            self._stop.wait(self.interval)


def _smaps_rollup_kib(pid: int) -> dict[str, int]:
    """Linux's per-process totals; Pss_Anon is heap/tensors, the rest of Pss is mapped files (memmap, libraries)."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        values[key] = int(value.split()[0])
    return values


def tree_memory_mib() -> dict[str, float]:
    """PSS and its anonymous part, summed over this process and its children (DataLoader workers)."""
    me = psutil.Process()
    totals = {"pss": 0.0, "pss_anon": 0.0}
    for process in [me, *me.children(recursive=True)]:
        try:
            rollup = _smaps_rollup_kib(process.pid)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # a worker that exited between listing and reading
        totals["pss"] += rollup["Pss"] / 1024
        totals["pss_anon"] += rollup.get("Pss_Anon", 0) / 1024
    return totals
