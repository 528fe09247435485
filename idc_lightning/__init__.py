"""IDC detection in breast histopathology with PyTorch Lightning and Hydra."""

import os

__version__ = "0.1.0"

# albumentations asks PyPI for a newer release on import, in every worker process that imports it: 33 warnings
# and up to 2 s each on an offline GPU node. Set NO_ALBUMENTATIONS_UPDATE=0 to have it check again.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
