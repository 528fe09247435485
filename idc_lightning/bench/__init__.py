"""Benchmarks: `python -m idc_lightning.bench` (CLI in `cli`), the measurements one module per kind, `report`
renders them."""
