"""Progress bars: drawn on rank 0 in a terminal around the long data steps, and nowhere else."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from lightning.pytorch.utilities import rank_zero_only
from rich.console import Console

import idc_lightning.data.progress as progress
from idc_lightning.data.cache import build_cache
from idc_lightning.data.manifest import build_manifest
from idc_lightning.data.synthetic import SyntheticSlides


def _terminal(buffer: io.StringIO) -> Console:
    return Console(file=buffer, force_terminal=True, width=160)


@pytest.fixture
def terminal_output(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """Every bar the project opens draws into this buffer as if stderr were a terminal."""
    buffer = io.StringIO()
    monkeypatch.setattr(progress, "Console", lambda **_: _terminal(buffer))
    return buffer


def test_bar_counts_to_its_total_on_rank_zero() -> None:
    buffer = io.StringIO()
    with progress.progress_bar("Packing", total=3, console=_terminal(buffer)) as advance:
        for _ in range(3):
            advance(1)
    assert "Packing" in buffer.getvalue() and "3/3" in buffer.getvalue()


def test_no_bar_on_other_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    buffer = io.StringIO()
    with progress.progress_bar("Packing", total=3, console=_terminal(buffer)) as advance:
        advance(3)
    assert buffer.getvalue() == ""


def test_no_bar_when_not_a_terminal() -> None:
    buffer = io.StringIO()
    with progress.progress_bar("Packing", total=3, console=Console(file=buffer)) as advance:
        advance(3)
    assert buffer.getvalue() == ""


def test_scan_and_cache_build_show_progress(tiny_data_dir: Path, tmp_path: Path, terminal_output: io.StringIO) -> None:
    root = next(tiny_data_dir.glob("synthetic_*/IDC_regular_ps50_idx5"))
    manifest, _ = build_manifest(root, tmp_path / "cache")
    build_cache(manifest, root, tmp_path / "cache", workers=1)
    shown = terminal_output.getvalue()
    assert f"Scanning {root}" in shown
    assert f"{len(manifest)}/{len(manifest)}" in shown  # the cache bar counts patches to the end


def test_synthetic_generation_shows_progress(tmp_path: Path, terminal_output: io.StringIO) -> None:
    SyntheticSlides(num_patients=2, grid_min=4, grid_max=5, seed=0, workers=1).write(tmp_path / "slides")
    assert "Writing synthetic patients" in terminal_output.getvalue()
    assert "2/2" in terminal_output.getvalue()
