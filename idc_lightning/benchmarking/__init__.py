"""The measurements behind `python -m idc_lightning.bench`, one module per kind; `report` renders them."""
