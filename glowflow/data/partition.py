"""Splitting one set of images into disjoint parts: the one home of the train/validation/test partition.

Two cuts, both deterministic:

* :func:`held_out_test` -- data that comes without a test split of its own (a flat folder, an .npz
  with only ``images``; found in :mod:`glowflow.data.custom`) holds out
  ``config.default_test_size(n)`` images as its test split, drawn by a generator seeded
  ``config.PARTITION_SEED``, so every command that reads the test split (training's report,
  sampling, outlier detection) gets the same images, and they are never trained on.
* :func:`split_validation` -- training carves its validation split (which chooses the best
  checkpoint) from the training split: ``--val_size`` images (default
  ``config.default_val_size(n)``) drawn by ``--seed``; the training split keeps the rest.

Each part keeps the order of the images it came from. :func:`subset` gives a part of a dataset as a
dataset (with the ``info`` and labels that the rest of glowflow reads).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from glowflow.config import PARTITION_SEED, SEED_STRIDE, default_test_size, default_val_size
from glowflow.data.datasets import ImageTensorDataset
from glowflow.errors import GlowflowError


def _draw(n: int, k: int, seed: int) -> Tuple[List[int], List[int]]:
    """(the other n - k indices, k indices drawn at random), each in increasing order."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    drawn = order[:k].sort().values.tolist()
    rest = order[k:].sort().values.tolist()
    return rest, drawn


def held_out_test(n: int, name: str) -> Tuple[List[int], List[int]]:
    """(training indices, test indices) of ``n`` images that come without a test split."""
    if n < 2:
        raise GlowflowError(
            f"{name} has {n} image(s) and no test split: at least 2 are needed to hold one out "
            f"(or give it train/ and test/ sub-folders, or train_images/test_images arrays)"
        )
    return _draw(n, default_test_size(n), PARTITION_SEED)


def validation_seed(seed: int) -> int:
    """The generator seed of the validation split drawn for run seed ``seed``."""
    return seed * SEED_STRIDE - 2


def resolve_val_size(val_size: Optional[int], n_train: int, name: str) -> int:
    """The validation split's size: ``val_size``, or the default for ``n_train`` images when None;
    GlowflowError when it would leave no training image."""
    size = default_val_size(n_train) if val_size is None else val_size
    if size < 0 or (size > 0 and size >= n_train):
        raise GlowflowError(
            f"val_size {size} must be smaller than the training split of {name} ({n_train} images); "
            f"0 turns the validation split off"
        )
    return size


def split_validation(dataset: Dataset, val_size: int, seed: int) -> Tuple[Dataset, Optional[Dataset], List[int]]:
    """(training part, validation part or None when ``val_size`` is 0, the validation indices into
    ``dataset``): ``val_size`` images drawn by ``validation_seed(seed)``."""
    if val_size == 0:
        return dataset, None, []
    rest, val = _draw(len(dataset), val_size, validation_seed(seed))
    return subset(dataset, rest), subset(dataset, val), val


def subset(dataset: Dataset, indices: Sequence[int]) -> Dataset:
    """The images of ``dataset`` at ``indices``, as a dataset with the same ``info``. An in-memory
    set stays one (its pixels gathered once); any other is viewed through :class:`Subset`."""
    if isinstance(dataset, ImageTensorDataset):
        index = torch.as_tensor(list(indices), dtype=torch.int64)
        return ImageTensorDataset(dataset.images[index], dataset.labels[index], dataset.info)
    return Subset(dataset, indices)


class Subset(Dataset):
    """``base`` seen through ``indices``; keeps its ``info`` and, when it holds them, its labels."""

    def __init__(self, base: Dataset, indices: Sequence[int]):
        self.base, self.indices, self.info = base, list(indices), base.info
        labels = getattr(base, "labels", None)
        if isinstance(labels, torch.Tensor):
            self.labels = labels[torch.as_tensor(self.indices, dtype=torch.int64)]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        return self.base[self.indices[i]]
