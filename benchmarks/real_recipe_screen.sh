#!/usr/bin/env bash
# The recipe screen of docs/results.md: each variant is `+experiment=real_cv` on the first 3 of its 5 folds
# (validation patients only decide; the fixed test patients are reported, never used to choose).
#   bash benchmarks/real_recipe_screen.sh DATA_ROOT OUT_DIR [VARIANT ...]
# Each variant writes OUT_DIR/<variant>/summary.md; a variant whose summary exists is skipped (rerun-safe).
set -euo pipefail
root=${1:?usage: real_recipe_screen.sh DATA_ROOT OUT_DIR [VARIANT ...]}
out=${2:?usage: real_recipe_screen.sh DATA_ROOT OUT_DIR [VARIANT ...]}
shift 2
python=${PYTHON:-python}
epochs=${EPOCHS:-3}
folds=${FOLDS:-0,1,2}

declare -A variants=(
  [base]=""
  [hed]="data.augment.hed_jitter=0.05"
  [b64]="data.batch_size=64"
  [ema]="callbacks=[default,ema]"
  [smooth]="model.label_smoothing=0.1"
  [macenko]="data.stain_norm=macenko"
  [size75]="data.image_size=75"
)
order=("$@")
[ ${#order[@]} -gt 0 ] || order=(base hed b64 ema smooth macenko size75)

for name in "${order[@]}"; do
  [ -v "variants[$name]" ] || { echo "unknown variant $name (known: ${!variants[*]})" >&2; exit 2; }
  [ -f "$out/$name/summary.md" ] && { echo "skip $name: $out/$name/summary.md exists"; continue; }
  start=$(date +%s)
  # shellcheck disable=SC2086  # the variant is a list of overrides
  "$python" -m idc_lightning.train +experiment=real_cv data.root="$root" trainer.max_epochs="$epochs" \
    data.fold="$folds" callbacks.heatmap=null hydra.sweep.dir="$out/$name" ${variants[$name]}
  echo "$name: $(( $(date +%s) - start )) s" | tee -a "$out/wall_times.txt"
done
