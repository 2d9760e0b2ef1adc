"""Where the commands cache a checkpoint's fitted detector: :func:`detector_cache_path_for`
(inside a model folder, or beside a checkpoint file), and the one a model folder holds:
:func:`pretrained_detector_path`. Below both :mod:`glowflow.ood.detector`
(``OutlierDetector.from_pretrained`` reads a model folder's detector there) and
:mod:`glowflow.ood.cache` (the commands reuse or write it there)."""

from __future__ import annotations

import glob
import os

from glowflow.config import dataset_slug
from glowflow.errors import GlowflowError
from glowflow.pretrained import PretrainedFolder, is_model_folder, resolve


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


def pretrained_detector_path(folder: str, name: str, n_bits: int) -> str:
    """The fitted detector of the model folder ``folder`` (asked for as ``name``): the one cached
    for the folder's dataset, else its only ``ood_detector_*_<n_bits>bit.npz``; a one-line
    GlowflowError when it holds none or several."""
    dataset = PretrainedFolder.open(folder).dataset
    path = detector_cache_path_for(folder, dataset, n_bits) if dataset else None
    if path is not None and os.path.isfile(path):
        return path
    found = sorted(glob.glob(os.path.join(glob.escape(resolve(folder)), f"ood_detector_*_{n_bits}bit.npz")))
    if len(found) != 1:
        raise GlowflowError(
            f"{name} holds {'no' if not found else 'more than one'} fitted outlier detector "
            f"(ood_detector_<dataset>_{n_bits}bit.npz): run glowflow --score IMAGES --checkpoint {name} "
            f"once to fit and cache it there, or fit one with OutlierDetector(model).fit(images)"
        )
    return found[0]
