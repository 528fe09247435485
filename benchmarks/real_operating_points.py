"""Which rule picks the operating point that transfers best to unseen patients: Youden's J or maximum F1?

    python benchmarks/real_operating_points.py DATA_ROOT SWEEP_DIR --cache-dir DIR   (train's paths.cache_dir)

Each rule maximises its own metric on the patients it is chosen on, so comparing them there is circular. Judged on
validation only: each validation patient in turn is called at the threshold the rule picks on the fold's other
validation patients (leave one patient out), and the calls pooled over the fold's validation patients give F1 and
balanced accuracy. The test columns apply each rule's threshold, chosen on all validation patients, to the test
patients, as `train` does (docs/results.md). Probabilities are in the checkpoint's spatial context, as eval scores.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from real_inference_variants import _inputs, _probabilities, sweep_folds, sweep_parser

from idc_lightning.checkpoints import RunCheckpoint
from idc_lightning.data.cache import PatchCache
from idc_lightning.evaluation.metrics import binary_metrics, confusion_counts, rates
from idc_lightning.evaluation.operating_point import THRESHOLD_METHODS, choose_threshold, is_idc
from idc_lightning.evaluation.spatial_context import smooth_patient_probabilities


def _in_context(cache: PatchCache, checkpoint: RunCheckpoint, split: str) -> pd.DataFrame:
    """patient_id, label and prob (in spatial context) of the checkpoint's patients of `split`."""
    rows = np.flatnonzero(cache.rows["patient_id"].astype(str).isin(set(checkpoint.patients[split])).to_numpy())
    places = cache.rows.iloc[rows][["patient_id", "x", "y", "label"]].reset_index(drop=True)
    probs = _probabilities(checkpoint.model(), _inputs(cache, checkpoint, rows))
    sigma = checkpoint.hyper_parameters.get("context_sigma", 0.0)
    return places.assign(prob=smooth_patient_probabilities(places.assign(patch_prob=probs), sigma))


def _left_out_calls(val: pd.DataFrame, method: str) -> np.ndarray:
    """Each validation patient called at the threshold `method` picks on the other validation patients."""
    calls = np.zeros(len(val), dtype=bool)
    for patient in val.patient_id.unique():
        own = (val.patient_id == patient).to_numpy()
        threshold = choose_threshold(val.prob[~own], val.label[~own], method)
        calls[own] = is_idc(val.prob[own], threshold)
    return calls


def main() -> None:
    checkpoints, cache = sweep_folds(sweep_parser(__doc__).parse_args())
    records = []
    for checkpoint in checkpoints:
        val, test = (_in_context(cache, checkpoint, split) for split in ("val", "test"))
        for method in THRESHOLD_METHODS:
            left_out = rates(confusion_counts(_left_out_calls(val, method), val.label.to_numpy() == 1))
            threshold = choose_threshold(val.prob, val.label, method)
            tested = binary_metrics(test.prob.to_numpy(), test.label.to_numpy(), threshold)
            records.append({"method": method, "fold": checkpoint.path.parent.parent.name, "threshold": threshold,
                            "val/f1 (patient left out)": left_out["f1"],
                            "val/bal_acc (patient left out)": left_out["bal_acc"],
                            "test/f1@val_thr": tested["f1"], "test/bal_acc@val_thr": tested["bal_acc"]})
            print(records[-1], flush=True)
    table = pd.DataFrame(records)
    columns = list(table.columns)[2:]
    print("| rule | folds | " + " | ".join(columns) + " |")
    print("|---|---:|" + "---:|" * len(columns))
    for method, folds in table.groupby("method", sort=False):
        cells = [f"{folds[c].mean():.3f} ± {folds[c].std():.3f}" for c in columns]
        print(f"| {method} | {len(folds)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
