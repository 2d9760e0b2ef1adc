"""The images an :class:`glowflow.ood.OutlierDetector` is given (``X``): a tensor or array
(N, C, H, W) in [0, 1], a Dataset yielding ``(image, label)``, or a DataLoader (or any iterable)
of such batches; as a loader in their order (:func:`as_loader`), as a map-style Dataset when they
are one (:func:`as_indexable`), and paired with class labels ``y`` (:func:`with_labels`)."""

from __future__ import annotations

from typing import Iterable, Optional, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from glowflow.data import make_loader
from glowflow.errors import GlowflowError

Images = Union[torch.Tensor, np.ndarray, Dataset, DataLoader, Iterable]


def as_loader(images: Images, batch_size: int) -> Iterable:
    """A loader over ``images``, in their order (a tensor, an array or a Dataset in batches of
    ``batch_size``; a DataLoader or other iterable as it is)."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if torch.is_tensor(images):
        _check_tensor(images)
        images = TensorDataset(images)
    if isinstance(images, Dataset) and hasattr(images, "__len__"):
        return make_loader(images, batch_size=batch_size, shuffle=False)
    if isinstance(images, Iterable):
        return images
    raise GlowflowError(f"images must be a tensor, a Dataset or a DataLoader, got {type(images).__name__}")


def as_indexable(images: Images) -> Optional[Dataset]:
    """``images`` as a map-style Dataset when they are one (a DataLoader's own dataset), else None."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if torch.is_tensor(images):
        return TensorDataset(images) if images.dim() == 4 else None
    if isinstance(images, DataLoader):
        images = images.dataset
    if isinstance(images, Dataset) and hasattr(images, "__len__"):
        return images
    return None


def with_labels(images: Images, y, batch_size: int) -> Images:
    """``images`` paired with the integer class labels ``y`` (N,), in their order: a Dataset of
    ``(image, label)`` (a DataLoader over one, at the given loader's batch size, for a DataLoader).
    Refused in one line for labels that are not a vector of integers, one per image, or images
    that cannot be paired (an iterable that is not over a map-style dataset)."""
    labels = np.asarray(y.detach().cpu() if torch.is_tensor(y) else y)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise GlowflowError(f"y must be a vector of integer class labels, got {labels.dtype} of shape {labels.shape}")
    if torch.is_tensor(images):
        _check_tensor(images)
    dataset = as_indexable(images)
    if dataset is None:
        raise GlowflowError("fit(X, y) needs X as a tensor, an array, a Dataset or a DataLoader over one")
    if len(labels) != len(dataset):
        raise GlowflowError(f"y has {len(labels)} labels for {len(dataset)} images")
    labelled = _Labelled(dataset, torch.from_numpy(labels.astype(np.int64)))
    if isinstance(images, DataLoader) and images.batch_size:
        return make_loader(labelled, images.batch_size or batch_size, shuffle=False)
    return labelled


def _check_tensor(images: torch.Tensor) -> None:
    if images.dim() != 4:
        raise GlowflowError(f"images must be a (N, C, H, W) tensor in [0, 1], got shape {tuple(images.shape)}")


class _Labelled(Dataset):
    """``(image, labels[i])`` for the i-th image of ``dataset`` (its own label, if any, dropped)."""

    def __init__(self, dataset: Dataset, labels: torch.Tensor):
        self.dataset, self.labels = dataset, labels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        return (item[0] if isinstance(item, (tuple, list)) else item), self.labels[i]
