"""Before the GPU benchmark on a bare, offline machine: install from the wheel folder only what this Python lacks,
then check that everything the GPU path imports is there. Standard library only: it runs before anything is
installed. `make gpu-wheels` (on a machine with network) fills the folder with the wheels of CARRIED.

    python3 -m idc_lightning.bench.preflight --wheels .gpu-wheels --target /tmp/idc-site [--dry-run]
    python3 -m idc_lightning.bench.preflight --print-specs      # what `make gpu-wheels` downloads
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

# What the GPU bench imports (module -> distribution). The lent GPU machine has all of these but CARRIED.
NEEDED = {"torch": "torch", "torchvision": "torchvision", "lightning": "lightning", "torchmetrics": "torchmetrics",
          "numpy": "numpy", "pandas": "pandas", "pyarrow": "pyarrow", "cv2": "opencv-python-headless",
          "rich": "rich", "PIL": "pillow", "psutil": "psutil"}
# Module -> pip requirement of what travels as a wheel because the lent GPU machine may lack it.
CARRIED = {"psutil": "psutil>=5.9", "openslide": "openslide-python>=1.4", "openslide_bin": "openslide-bin>=4.0",
           "shapely": "shapely>=2.0"}
HOW_TO_PREPARE = ("on a machine with network access run `make gpu-wheels`, then bring the .gpu-wheels folder to "
                  "the GPU machine with the checkout")


def _missing(modules: list[str]) -> list[str]:
    return [module for module in modules if importlib.util.find_spec(module) is None]


def _wheel_for(module: str, wheels: Path) -> Path:
    distribution = re.split(r"[<>=!~ ;\[]", CARRIED[module])[0].replace("-", "_").lower()
    found = sorted(wheels.glob(f"{distribution}-*.whl"))
    if not found:
        raise SystemExit(f"{module} is not installed in {sys.executable} and {wheels}/ holds no {distribution} "
                         f"wheel: {HOW_TO_PREPARE}")
    return found[-1]


def install_missing(wheels: Path, target: Path) -> list[str]:
    """pip-install into `target`, offline and without dependencies, the carried wheels whose module is missing."""
    missing = _missing(list(CARRIED))
    if not missing:
        return []
    files = [str(_wheel_for(module, wheels)) for module in missing]
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                    "--target", str(target), *files], check=True)
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    return missing


def check(dry_run: bool) -> str:
    """Every module the GPU path needs, and a CUDA torch unless this is the dry run; the versions found."""
    missing = _missing(list(NEEDED))
    if missing:
        names = ", ".join(f"{module} ({NEEDED[module]})" for module in missing)
        fix = HOW_TO_PREPARE if set(missing) <= set(CARRIED) else (
            "install them into this Python, or add them to CARRIED in idc_lightning/bench/preflight.py")
        raise SystemExit(f"{sys.executable} lacks {names}: {fix}")
    torch = importlib.import_module("torch")
    if not dry_run and not torch.cuda.is_available():
        raise SystemExit(f"{sys.executable} imports torch {torch.__version__} (CUDA build {torch.version.cuda}) but "
                         "sees no CUDA device: run on the GPU machine, or pass --dry-run to test on a CPU")
    return ", ".join(f"{module} {getattr(importlib.import_module(module), '__version__', '?')}"
                     for module in ("torch", "torchvision", "lightning", "torchmetrics", "numpy"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python3 -m idc_lightning.bench.preflight", description=__doc__)
    parser.add_argument("--wheels", type=Path, default=Path(".gpu-wheels"), help="folder of `make gpu-wheels`")
    parser.add_argument("--target", type=Path, default=None, help="where missing wheels are installed")
    parser.add_argument("--dry-run", action="store_true", help="no CUDA needed (the CPU dry run)")
    parser.add_argument("--print-specs", action="store_true", help="print the pip requirements of CARRIED and exit")
    args = parser.parse_args(argv)
    if args.print_specs:
        print(" ".join(CARRIED.values()))
        return
    installed = install_missing(args.wheels, args.target) if args.target is not None else []
    versions = check(args.dry_run)
    print(f"preflight ok: {sys.executable}; installed from {args.wheels}/: {', '.join(installed) or 'nothing'}; "
          f"{versions}")


if __name__ == "__main__":
    main()
