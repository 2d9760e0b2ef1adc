"""The user's own data: a folder of images or a .npz file of uint8 pixels, given by its path.

:func:`custom_dataset` gives (DatasetInfo, build(data_root, download) -> Dataset) for a path,
reading no more than it needs for the info (the first image of a folder; a .npz's arrays).

This is where data is found to lack a test split (a folder without train/ and test/ sub-folders,
an .npz without ``train_``/``test_`` arrays): its test split is then a fixed tenth of its images,
held out by :func:`glowflow.data.partition.held_out_test`, and its training split the rest; the
dataset of either split says so in ``held_out_from`` (the number of images partitioned). The split
``"all"`` is every image, unpartitioned (for looking at a file's contents; never for training).
"""

from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from glowflow.data.datasets import (
    GREY_MODES,
    IMAGE_EXTENSIONS,
    DatasetInfo,
    ImageFileDataset,
    ImageList,
    ImageTensorDataset,
    list_images,
    loops_back,
    open_image,
    square_resize,
)
from glowflow.data.npzfile import open_npz
from glowflow.data.partition import held_out_test
from glowflow.errors import GlowflowError

Build = Callable[[str, bool], Dataset]


def looks_like_path(name: str) -> bool:
    """True if ``name`` is (or is written as) a path: it exists, has a separator, or ends in .npz."""
    return os.path.exists(name) or "/" in name or os.sep in name or name.endswith(".npz")


def custom_dataset(path: str, split: str, image_size: Optional[int]) -> Tuple[DatasetInfo, Build]:
    """(DatasetInfo, build(data_root, download) -> Dataset) for the folder or .npz file at ``path``."""
    if not os.path.exists(path):
        raise GlowflowError(f"dataset path {path} does not exist")
    if os.path.isdir(path):
        return _custom_folder(path, split, image_size)
    if path.endswith(".npz"):
        return _custom_npz(path, split, image_size)
    raise GlowflowError(f"{path} is neither a folder of images nor a .npz file")


def _subfolder(root: str, names: Sequence[str]) -> Optional[str]:
    return next((os.path.join(root, n) for n in names if os.path.isdir(os.path.join(root, n))), None)


def folder_samples(path: str, split: str) -> Tuple[Optional[str], List[str], List[Tuple[str, int]]]:
    """``(split folder, classes, samples)`` of the image folder at ``path``: the train/ or test/
    (val/) sub-folder of ``split`` when there are such (None when there are not), the class
    sub-folders (sorted; a link back to the folder or above it is no class) and the (file, label)
    pairs of every image listed (label = the class's index, 0 without classes). GlowflowError
    when there is no image."""
    split_dirs = {"train": _subfolder(path, ["train"]), "test": _subfolder(path, ["test", "val"])}
    if any(split_dirs.values()):
        if split not in split_dirs:
            raise GlowflowError(f"{path} has train/test sub-folders: load its splits by name, not {split!r}")
        folder = split_dirs[split]
        if folder is None:
            raise GlowflowError(
                f"{path} has a {'test (or val)' if split == 'train' else 'train'} folder but no "
                f"{'train' if split == 'train' else 'test (or val)'} folder"
            )
        tops = [d for d in split_dirs.values() if d]
    else:
        folder, tops = None, [path]
    classes = sorted(
        {
            d
            for top in tops
            for d in os.listdir(top)
            if not d.startswith(".")
            and os.path.isdir(os.path.join(top, d))
            and not loops_back(os.path.join(top, d), top)
        }
    )
    listed = folder or path
    if classes:
        samples = [(p, i) for i, c in enumerate(classes) for p in list_images(os.path.join(listed, c))]
    else:
        samples = [(p, 0) for p in list_images(listed)]
    if not samples:
        raise GlowflowError(
            f"no images in {listed}: expected one sub-folder per class, or image files "
            f"({' '.join(IMAGE_EXTENSIONS)}) directly in it"
        )
    return folder, classes, samples


def has_split_folders(path: str) -> bool:
    """Whether the image folder at ``path`` has train/ or test/ (val/) sub-folders of its own."""
    return _subfolder(path, ["train", "test", "val"]) is not None


def _custom_folder(path: str, split: str, image_size: Optional[int]) -> Tuple[DatasetInfo, Build]:
    """One sub-folder per class (:func:`folder_samples`), or images directly in the folder
    (label 0). With train/ and test/ (or val/) sub-folders those are the two splits; otherwise the
    test split is a fixed tenth of the images (:func:`held_out_test`) and the training split the
    rest. Image shape: the first image's mode (grey or RGB) and its shorter side, unless
    image_size is given."""
    folder, classes, samples = folder_samples(path, split)
    first = open_image(samples[0][0])
    channels = 1 if first.mode in GREY_MODES else 3
    size = image_size or min(first.size)
    info = DatasetInfo(path, (channels, size, size), max(len(classes), 1), False)

    def build(data_root: str, download: bool) -> Dataset:
        held_out_from, chosen = None, samples
        if folder is None and split != "all":  # no split of its own: hold out a fixed test split
            held_out_from = len(samples)
            chosen = [samples[i] for i in _split_indices(len(samples), split, path)]
        return _mark(ImageFileDataset(ImageList(chosen), info), held_out_from)

    return info, build


def _split_indices(n: int, split: str, name: str):
    """The indices of ``split`` among ``n`` images that come without a test split."""
    train, test = held_out_test(n, name)
    return test if split == "test" else train


def _mark(dataset: Dataset, held_out_from: Optional[int]) -> Dataset:
    """``dataset`` with ``held_out_from``: the number of images its split was held out of, or None."""
    dataset.held_out_from = held_out_from
    return dataset


def _check_declared_images(path: str, member) -> None:
    """The images array's declared dtype and shape (:mod:`glowflow.data.npzfile`), checked before
    it is read: uint8, (N, H, W) or (N, H, W, C) with C 1 or 3."""
    if member.dtype != np.uint8:
        raise GlowflowError(f"{path}: images must be uint8 pixels, got {member.dtype}")
    shape = member.shape
    if not (len(shape) == 3 or (len(shape) == 4 and shape[-1] in (1, 3))):
        raise GlowflowError(f"{path}: images must be (N, H, W) or (N, H, W, C) with C 1 or 3, got {shape}")


def _custom_npz(path: str, split: str, image_size: Optional[int]) -> Tuple[DatasetInfo, Build]:
    """``images`` uint8 (N, H, W) or (N, H, W, C) and optional ``labels``: (N,) integers or (N, K)
    multi-hot, partitioned into a fixed test tenth and a training rest (:func:`held_out_test`).
    Per-split ``train_images``/``test_images`` (with ``train_labels``/``test_labels``) are used
    when there is no ``images``. Read with allow_pickle=False."""
    with open_npz(path, ".npz file") as (npz, declared):
        keys = set(npz.files)
        prefix = "" if "images" in keys else f"{split}_"
        if prefix and split not in ("train", "test"):
            raise GlowflowError(f"{path} has train_/test_ arrays: load its splits by name, not {split!r}")
        if f"{prefix}images" not in keys:
            raise GlowflowError(
                f"{path} has no 'images' array (it has: {', '.join(sorted(keys)) or 'nothing'}); expected "
                f"'images' (N, H, W) or (N, H, W, C) uint8 and optional 'labels'"
            )
        _check_declared_images(path, declared[f"{prefix}images"])
        images = npz[f"{prefix}images"]
        labels = npz[f"{prefix}labels"] if f"{prefix}labels" in keys else None
    if images.dtype != np.uint8:
        raise GlowflowError(f"{path}: images must be uint8 pixels, got {images.dtype}")
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    else:
        raise GlowflowError(f"{path}: images must be (N, H, W) or (N, H, W, C) with C 1 or 3, got {images.shape}")
    n = len(images)
    if n == 0:
        raise GlowflowError(f"{path}: the images array is empty")
    multilabel = False
    if labels is None:
        labels, num_classes = np.zeros(n, dtype=np.int64), 1
    elif labels.ndim not in (1, 2) or len(labels) != n or not np.issubdtype(labels.dtype, np.number):
        raise GlowflowError(
            f"{path}: labels must be {n} integers or {n} multi-hot rows, got {labels.dtype} "
            f"array of shape {labels.shape}"
        )
    elif labels.ndim == 2 and labels.shape[1] > 1:
        multilabel, num_classes = True, labels.shape[1]
    else:
        labels = labels.reshape(n)
        if labels.min() < 0 or not np.array_equal(labels, np.round(labels)):
            raise GlowflowError(f"{path}: labels must be non-negative integers")
        num_classes = int(labels.max()) + 1
    size = image_size or min(images.shape[-2:])
    info = DatasetInfo(path, (images.shape[1], size, size), num_classes, multilabel)

    def build(data_root: str, download: bool) -> Dataset:
        held_out_from, chosen, chosen_labels = None, images, labels
        if not prefix and split != "all":  # one array for both splits: hold out a fixed test split
            held_out_from = n
            keep = _split_indices(n, split, path)
            chosen, chosen_labels = images[keep], labels[keep]
        pixels = square_resize(torch.from_numpy(np.ascontiguousarray(chosen)), size)
        dataset = ImageTensorDataset(
            pixels, torch.from_numpy(chosen_labels).to(torch.float32 if multilabel else torch.int64), info
        )
        return _mark(dataset, held_out_from)

    return info, build
