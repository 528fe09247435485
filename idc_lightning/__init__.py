"""IDC detection in breast histopathology with PyTorch Lightning and Hydra."""

__version__ = "0.1.0"
