#!/usr/bin/env bash
# The recipe screen of docs/results.md: each variant is `+experiment=real_cv` on the first 3 of its 5 folds
# (validation patients only decide; the fixed test patients are reported, never used to choose). `base` is
# real_cv as first screened: the plain shuffle (data.sampler=random), no weight averaging (callbacks=default) and
# each patch alone (model.context_sigma=0), which later runs adopted; each variant makes one change to it.
#   bash benchmarks/real_recipe_screen.sh DATA_ROOT OUT_DIR [VARIANT ...]
# Each variant writes OUT_DIR/<variant>/summary.md; a variant whose summary exists is skipped (rerun-safe).
set -euo pipefail
set -f  # overrides like callbacks=[default,ema] are not file globs
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
  [lr2e-3]="model.optimizer.lr=2e-3"
  [patient]="data.sampler=patient"
  [wd5e-2]="model.optimizer.weight_decay=0.05"
  [strong_color]="data.augment.brightness=0.25 data.augment.contrast=0.25 data.augment.saturation=0.25 data.augment.hue=0.08"
)
order=("$@")
[ ${#order[@]} -gt 0 ] || order=(base hed b64 ema smooth macenko size75 lr2e-3 strong_color patient wd5e-2)

for name in "${order[@]}"; do
  [ -v "variants[$name]" ] || { echo "unknown variant $name (known: ${!variants[*]})" >&2; exit 2; }
  [ -f "$out/$name/summary.md" ] && { echo "skip $name: $out/$name/summary.md exists"; continue; }
  overrides=${variants[$name]}
  [[ $overrides == *data.sampler=* ]] || overrides="data.sampler=random $overrides"
  [[ $overrides == *callbacks=* ]] || overrides="callbacks=default $overrides"
  overrides="model.context_sigma=0 $overrides"
  start=$(date +%s)
  # shellcheck disable=SC2086  # the variant is a list of overrides
  "$python" -m idc_lightning.train +experiment=real_cv data.root="$root" trainer.max_epochs="$epochs" \
    data.fold="$folds" callbacks.heatmap=null hydra.sweep.dir="$out/$name" $overrides
  echo "$name: $(( $(date +%s) - start )) s" | tee -a "$out/wall_times.txt"
done

# The variant table of docs/results.md: mean ± sample std over the folds of each variant, and its validation AUROC
# change against `base` on the same folds (paired: the folds differ far more than the variants do).
"$python" - "$out" <<'PY'
import pathlib
import sys

import pandas as pd

out = pathlib.Path(sys.argv[1])
columns = ["val/auroc", "val/loss", "test/auroc", "test/f1@val_thr", "test/bal_acc@val_thr"]


def completed(summary: pathlib.Path) -> pd.DataFrame:
    jobs = pd.read_csv(summary)
    return jobs[jobs["status"] == "completed"].set_index("data.fold")


base = completed(out / "base" / "summary.csv") if (out / "base" / "summary.csv").is_file() else None
print("| variant | folds | " + " | ".join(columns) + " | Δ val/auroc vs base |")
print("|---|---:|" + "---:|" * (len(columns) + 1))
for summary in sorted(out.glob("*/summary.csv")):
    jobs = completed(summary)
    cells = [f"{jobs[c].mean():.3f} ± {jobs[c].std():.3f}" for c in columns]
    if base is not None and summary.parent.name != "base":
        change = (jobs["val/auroc"] - base["val/auroc"]).dropna()
        cells.append(f"{change.mean():+.3f} ± {change.std():.3f}")
    else:
        cells.append("")
    print(f"| {summary.parent.name} | {len(jobs)} | " + " | ".join(cells) + " |")
PY
