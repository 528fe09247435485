#!/usr/bin/env bash
# GPU benchmarks on a machine with one NVIDIA GPU: train/inference img/s for eager vs torch.compile, fp32 vs bf16,
# 50 vs 224 px, channels_last, and the three ways of feeding the GPU; writes docs/benchmarks_gpu.md.
# Usage: bash benchmarks/gpu.sh [SECONDS_PER_MEASUREMENT]   (default 5: about 20 measurements, inside 8 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_MEASUREMENT="${1:-5}"
# Pick the torch build for this machine's CUDA, e.g. TORCH_SPEC="torch==2.14.1 torchvision==0.29.1" (the default).
make install
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# Full-scale synthetic set (162 patients, ~284k patches; reused when already there), then the cache, then the runs.
.venv/bin/python -m idc_lightning.bench --gpu --data-dir data/bench --seconds "$SECONDS_PER_MEASUREMENT" \
    --out docs/benchmarks_gpu.md
