"""The benchmark's result rows and their rendering: a rich table for the terminal, markdown for docs/."""

from __future__ import annotations

import datetime
import os
import platform
from dataclasses import dataclass

import lightning as L
import torch
from rich.table import Table


@dataclass
class Row:
    """One measured number of the results table."""

    section: str
    measurement: str
    value: float
    unit: str
    note: str = ""


def _number(value: float) -> str:
    return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.3g}"


def table(rows: list[Row], title: str) -> Table:
    result = Table(title=title)
    for column in ("section", "measurement", "value", "unit", "note"):
        result.add_column(column, justify="right" if column == "value" else "left")
    for row in rows:
        result.add_row(row.section, row.measurement, _number(row.value), row.unit, row.note)
    return result


def machine() -> str:
    described = (f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                 f"Python {platform.python_version()}, torch {torch.__version__}, lightning {L.__version__}")
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_properties(0)
        described += (f", {torch.cuda.device_count()} x {gpu.name} ({gpu.total_memory / 2**30:.0f} GiB), "
                      f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    return described


def markdown(rows: list[Row], command: str, notes: list[str], title: str = "Benchmarks") -> str:
    lines = [
        f"# {title}",
        "",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- Machine: {machine()}",
        f"- Command: `{command}`",
        *[f"- {note}" for note in notes],
        "",
        "| section | measurement | value | unit | note |",
        "|---|---|---:|---|---|",
        *[f"| {r.section} | {r.measurement} | {_number(r.value)} | {r.unit} | {r.note} |" for r in rows],
        "",
    ]
    return "\n".join(lines)
