"""Where the commands cache a checkpoint's fitted detector: :func:`detector_cache_path_for`
(inside a model folder, or beside a checkpoint file). Below both :mod:`glowflow.ood.detector`
(``OutlierDetector.from_pretrained`` reads a model folder's detector there) and
:mod:`glowflow.ood.cache` (the commands reuse or write it there)."""

from __future__ import annotations

import os

from glowflow.config import dataset_slug
from glowflow.pretrained import is_model_folder, resolve


def detector_cache_path_for(checkpoint_path: str, dataset: str, n_bits: int) -> str:
    """Where the command line caches a checkpoint's detector (fitted on ``dataset`` at ``n_bits``):
    inside a model folder (and ``pretrained:NAME``), ``<folder>/ood_detector_<dataset>_<n_bits>bit.npz``,
    so that it travels with the folder; beside a checkpoint file,
    ``<checkpoint stem>.ood_detector_<dataset>_<n_bits>bit.npz``."""
    name = f"ood_detector_{dataset_slug(dataset)}_{int(n_bits)}bit.npz"
    if is_model_folder(checkpoint_path):
        return os.path.join(os.path.abspath(resolve(checkpoint_path)), name)
    stem = os.path.splitext(os.path.abspath(checkpoint_path))[0]
    return f"{stem}.{name}"
