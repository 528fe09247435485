"""Every input file is used or listed: the files under data.root that gave no patch, and why, in the run folder."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from idc_lightning.data.manifest import ManifestReport

log = logging.getLogger(__name__)

# In the run folder: every file under data.root that gave no patch, and why.
UNUSED_FILES = "skipped_files.csv"


def unused_files(report: ManifestReport | None, undecodable: pd.DataFrame) -> pd.DataFrame:
    """Files under data.root that no patch comes from: (path relative to the root, kind, reason)."""
    ignored = report.ignored if report is not None else []
    by_name = report.skipped if report is not None else []
    unread = report.unread if report is not None else []
    frames = [
        pd.DataFrame({"path": ignored, "kind": "not a patch name",
                      "reason": "the name is not <patient>_idx5_x<X>_y<Y>_class<0|1>.png"}),
        pd.DataFrame(by_name, columns=["path", "reason"]).assign(kind="patch skipped by name"),
        pd.DataFrame(unread, columns=["path", "reason"]).assign(kind="not read"),
        undecodable[["path", "reason"]].assign(kind="undecodable patch"),
    ]
    return pd.concat(frames, ignore_index=True)[["path", "kind", "reason"]]


def report_input_files(report: ManifestReport | None, undecodable: pd.DataFrame, root: Path,
                       output_dir: Path | None) -> None:
    """Log the scan's summary, warn about misplaced patches, and write the unused files to the run folder's
    skipped_files.csv (or name a few in the log when there is no run folder)."""
    if report is not None:
        log.info("%s", report.summary())
        if report.misplaced:
            log.warning("Patches in another patient's folder count for the patient their file name gives: %d, "
                        "e.g. %s (%s)", len(report.misplaced), report.misplaced[0]["path"],
                        report.misplaced[0]["reason"])
    unused = unused_files(report, undecodable)
    if unused.empty:
        return
    kinds = ", ".join(f"{n} {kind}" for kind, n in unused["kind"].value_counts().items())
    if output_dir is None:
        log.warning("%d files under %s are not used (%s), e.g. %s", len(unused), root, kinds,
                    "; ".join(f"{row.path}: {row.reason}" for row in unused.head(3).itertuples()))
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    unused.to_csv(output_dir / UNUSED_FILES, index=False)
    log.warning("%d files under %s are not used (%s): listed with the reason in %s", len(unused), root, kinds,
                output_dir / UNUSED_FILES)
