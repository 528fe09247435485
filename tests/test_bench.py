"""The benchmark tool end to end on a tiny generated set: every table row present, every number sensible; the GPU
path's dry run on the CPU; the offline preflight of the lent GPU machine."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from idc_lightning.bench import cli as bench
from idc_lightning.bench import preflight

REPO = Path(__file__).resolve().parents[1]
LOADER_PATHS = {"PIL per file + albumentations", "cache + albumentations", "cache + batch augment (CPU)",
                "cache + batch augment in workers (CPU)"}
AUGMENT_ALONE = "batch augment alone (CPU, no loader)"
GPU_DRY_RUN_TRAIN = {"GPU-resident eager fp32 50px", "GPU-resident eager bf16 50px", "DataLoader eager bf16 50px",
                     "device aug eager bf16 50px", "GPU-resident eager fp32 64px", "GPU-resident eager bf16 64px"}
WHOLE_SLIDE = ("predict tiles/s", "model share", "peak memory")
GPU_DRY_RUN_INFERENCE = {"GPU-resident eager fp32 50px", "GPU-resident eager bf16 50px",
                         "GPU-resident eager bf16 64px"}


def _by_section(rows: list) -> dict[str, set[str]]:
    sections: dict[str, set[str]] = {}
    for row in rows:
        sections.setdefault(row.section, set()).add(row.measurement)
    return sections


def test_quick_bench_writes_every_row(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    rows = bench.main(["--quick", "--data-dir", str(tmp_path / "data"), "--out", str(out),
                       "--real", str(tmp_path / "no_real_sample")])

    by_section = _by_section(rows)
    assert by_section["build"] == {"synthetic set", "manifest scan (synthetic)", "cache build (synthetic)",
                                   "unchanged-tree check and reuse (synthetic)"}
    assert by_section["loader (synthetic)"] == LOADER_PATHS | {AUGMENT_ALONE}
    assert by_section["memory (synthetic)"] == LOADER_PATHS
    assert by_section["training (cpu)"] == {"bare PyTorch loop", "Lightning Trainer", "Lightning overhead"}
    assert by_section["whole slide (cpu)"] == {f"{kind}, 4000px level 0" for kind in WHOLE_SLIDE}
    assert all(row.value > 0 for row in rows if row.measurement != "Lightning overhead")

    text = out.read_text()
    assert "python -m idc_lightning.bench --quick" in text
    assert "Real sample: absent (skipped)" in text
    assert "GPU: see docs/benchmarks_gpu.md" in text
    assert "| loader (synthetic) | cache + albumentations |" in text


def test_gpu_dry_run_measures_every_eager_row_and_lists_compile_as_skipped(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks_gpu.md"
    rows = bench.main(["--dry-run", "--data-dir", str(tmp_path / "data"), "--out", str(out)])

    by_section = _by_section(rows)
    assert by_section["gpu train"] == GPU_DRY_RUN_TRAIN
    assert by_section["gpu inference"] == GPU_DRY_RUN_INFERENCE
    assert by_section["gpu memory"] == {"resident patch set"}
    assert by_section["whole slide (cpu dry run)"] == {f"{kind}, 4000px level 0" for kind in WHOLE_SLIDE}
    assert all(row.value > 0 for row in rows if row.section.startswith("gpu"))
    assert all("(extrapolated)" in row.note for row in rows if row.section == "gpu train")

    text = out.read_text()
    assert text.startswith("# GPU benchmarks (dry run on the CPU)")
    assert "gpu train GPU-resident compile bf16 50px (torch.compile is not tried in the CPU dry run)" in text
    assert "gpu inference GPU-resident compile bf16 50px" in text


def test_gpu_rows_past_the_deadline_are_skipped_not_run(tmp_path: Path) -> None:
    rows = bench.main(["--dry-run", "--budget", "0", "--data-dir", str(tmp_path / "data"),
                       "--out", str(tmp_path / "gpu.md")])

    assert not {"gpu train", "gpu inference"} & {row.section for row in rows}
    text = (tmp_path / "gpu.md").read_text()
    assert "gpu train GPU-resident eager fp32 50px (would end past the time budget)" in text


def test_gpu_bench_path_does_not_import_albumentations() -> None:
    """The lent GPU machine has no albumentations: the GPU path and device augmentation must not need it."""
    modules = ["idc_lightning.bench.cli", "idc_lightning.bench.gpu", "idc_lightning.bench.preflight",
               "idc_lightning.data.device_augment"]
    code = f"import sys\nfor name in {modules!r}: __import__(name)\nprint('albumentations' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def _fake_wheel(folder: Path) -> Path:
    """A minimal pure-python wheel of a module that no Python has, standing in for a carried one."""
    wheel = folder / "idc_fake_carried-1.0-py3-none-any.whl"
    info = "idc_fake_carried-1.0.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("idc_fake_carried/__init__.py", "__version__ = '1.0'\n")
        archive.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: idc-fake-carried\nVersion: 1.0\n")
        archive.writestr(f"{info}/WHEEL",
                         "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return wheel


def test_preflight_installs_only_missing_carried_wheels_offline(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _fake_wheel(wheels)
    monkeypatch.setattr(preflight, "CARRIED", {"idc_fake_carried": "idc-fake-carried>=1", "numpy": "numpy"})
    monkeypatch.setattr(sys, "path", list(sys.path))

    installed = preflight.install_missing(wheels, tmp_path / "site")

    assert installed == ["idc_fake_carried"]  # numpy is there already: no numpy wheel is needed or looked for
    assert (tmp_path / "site" / "idc_fake_carried" / "__init__.py").is_file()


def test_preflight_says_which_wheel_is_missing_and_how_to_prepare_it(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preflight, "CARRIED", {"idc_fake_carried": "idc-fake-carried>=1"})

    with pytest.raises(SystemExit, match=r"idc_fake_carried is not installed .*make gpu-wheels"):
        preflight.install_missing(tmp_path, tmp_path / "site")


@pytest.mark.slow
def test_gpu_sh_dry_run_runs_offline_on_a_cpu(tmp_path: Path) -> None:
    """benchmarks/gpu.sh as the device machine runs it, with this Python and no CUDA."""
    environment = {**os.environ, "PYTHON": sys.executable, "REPORT": str(tmp_path / "gpu.md"),
                   "GPU_WHEELS": str(tmp_path / "no_wheels"), "SITE": str(tmp_path / "site"),
                   "OUT": str(tmp_path / "out")}
    (tmp_path / "out").mkdir()
    subprocess.run(["bash", "benchmarks/gpu.sh", "--dry-run", "--data-dir", str(tmp_path / "data")], cwd=REPO,
                   env=environment, check=True, capture_output=True)

    assert "| gpu train | device aug eager bf16 50px |" in (tmp_path / "gpu.md").read_text()
    assert (tmp_path / "out" / "gpu.md").read_text() == (tmp_path / "gpu.md").read_text()
