#!/usr/bin/env bash
# GPU benchmarks in one call on a bare, offline machine with one NVIDIA GPU: seconds per full-set training epoch
# and img/s for the DataLoader, device-augmentation and GPU-resident paths, bf16 vs fp32, eager vs torch.compile,
# 50 vs 224 px, inference img/s and device memory, inside an 8-minute budget. Writes docs/benchmarks_gpu.md and
# copies it to $OUT when that is set (the device tool brings $OUT back).
#
# Prepare once, on a machine with network:  make gpu-wheels   (then carry .gpu-wheels with the command)
# Usage: bash benchmarks/gpu.sh [--dry-run] [other options of python -m idc_lightning.bench]
#   --dry-run  the same path on a CPU with a tiny set and tiny sizes, in seconds (a test in make test runs it)
# Environment: PYTHON (default python3: the machine's own, with its CUDA torch), GPU_WHEELS (default .gpu-wheels),
#   SITE (where missing wheels are installed, default /tmp/idc-site), REPORT (the markdown written).
set -euo pipefail
cd "$(dirname "$0")/.."

python="${PYTHON:-python3}"
dry_run=""
for arg in "$@"; do
    if [[ "$arg" == --dry-run ]]; then dry_run="--dry-run"; fi
done
default_report=docs/benchmarks_gpu.md
if [[ -n "$dry_run" ]]; then default_report=outputs/bench/benchmarks_gpu_dry_run.md; fi
report="${REPORT:-$default_report}"
site="${SITE:-/tmp/idc-site}"

# The project comes from this checkout and what the machine lacks from $site: nothing is fetched, nothing built.
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$python" -m idc_lightning.bench.preflight --wheels "${GPU_WHEELS:-.gpu-wheels}" --target "$site" $dry_run
if [[ -z "$dry_run" ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
"$python" -m idc_lightning.bench --gpu --out "$report" "$@"
if [[ -n "${OUT:-}" ]]; then
    cp "$report" "$OUT/"
fi
