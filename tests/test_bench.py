"""The benchmark tool end to end on a tiny generated set: every table row present, every number sensible."""

from __future__ import annotations

from pathlib import Path

from idc_lightning.bench import cli as bench

LOADER_PATHS = {"PIL per file + albumentations", "cache + albumentations", "cache + batch augment (CPU)",
                "cache + batch augment in workers (CPU)"}
AUGMENT_ALONE = "batch augment alone (CPU, no loader)"


def test_quick_bench_writes_every_row(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    rows = bench.main(["--quick", "--data-dir", str(tmp_path / "data"), "--out", str(out),
                       "--real", str(tmp_path / "no_real_sample")])

    by_section: dict[str, set[str]] = {}
    for row in rows:
        by_section.setdefault(row.section, set()).add(row.measurement)
    assert by_section["build"] == {"manifest scan (synthetic)", "cache build (synthetic)"}
    assert by_section["loader (synthetic)"] == LOADER_PATHS | {AUGMENT_ALONE}
    assert by_section["memory (synthetic)"] == LOADER_PATHS
    assert by_section["training (cpu)"] == {"bare PyTorch loop", "Lightning Trainer", "Lightning overhead"}
    assert all(row.value > 0 for row in rows if row.measurement != "Lightning overhead")

    text = out.read_text()
    assert "python -m idc_lightning.bench --quick" in text
    assert "GPU: unmeasured" in text
    assert "| loader (synthetic) | cache + albumentations |" in text
