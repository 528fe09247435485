"""`python -m idc_lightning.bench`: the benchmark CLI (`idc_lightning.bench.cli`)."""

from idc_lightning.bench.cli import main

main()
