"""Everything that turns predictions into numbers, tables, figures and heatmaps; each metric is defined once.

operating_point: the decision rule (prob >= threshold) and how the threshold is chosen on validation.
metrics: patch- and patient-level metrics over prediction vectors and DataFrames.
slide_grid / heatmaps: patches placed back on their slide, per-patient heatmap figures.
figures: ROC, precision-recall and confusion-matrix PNGs, and sending PNGs to loggers.
report: the files of a tested run (results.json, predictions, patients.csv) and the console table.
"""
