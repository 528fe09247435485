"""Whole-slide prediction: read any slide format, tile its tissue at the training scale, write viewer outputs."""
