"""kit: a notebook kit for the Kaggle HuBMAP "Hacking the Kidney" glomerulus segmentation.

Modules, one concept each: ``rle`` (the competition's run-length encoding), ``slides`` (whole-slide
TIFFs read by windows), ``tiling`` (tiling plans and the tissue rule), ``polygons`` (annotation
polygons to masks), ``synthetic`` (a small dataset in the competition's layout), ``data``,
``model``, ``losses``, ``metrics``, ``train``, ``infer``, ``submit``, ``plots``, ``env`` and
``cli`` (``python -m kit``).
"""

__version__ = "0.1.0"

import os as _os

# albumentations checks PyPI for a newer version when imported: offline (the Kaggle submission)
# that is a network attempt and a timeout. The kit never wants it.
_os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
