"""Loading a dataset by name or path: :func:`dataset_info` and :func:`load_dataset` (and
:func:`check_divisible`, the image-size check that names the ``--image_size`` that fits).

A name is one of the 13 datasets (:mod:`glowflow.data.specs`), a development set
(:mod:`glowflow.data.devsets`: a class subset or flip of another name, whose base is loaded
here, or a synthetic set), or else the path of the user's own folder or .npz file
(:mod:`glowflow.data.custom`).

Where a named dataset's files come from, in order: ``data_root`` in torchvision's and medmnist's
own layouts (so an existing download is reused); the places an OS package or the library itself
keeps them (Debian's ``dataset-fashion-mnist`` in /usr/share/datasets/fashion-mnist, medmnist's
~/.medmnist); then the library's own download into ``data_root`` (with a short socket timeout).
When all fail, one :class:`GlowflowError` names every place looked at, the layout expected and how
to get the files. Resizing is torchvision's bilinear ``Resize`` of the PIL image (``image_size``
overrides the side); for the in-memory sets it runs once, when the dataset is loaded, not at
every item read.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Optional, Tuple

from torch.utils.data import Dataset

from glowflow.config import MAX_IMAGE_SIZE
from glowflow.data import custom, devsets
from glowflow.data.datasets import DatasetInfo, ImageFileDataset, ImageTensorDataset, one_line, square_resize
from glowflow.data.readers import Arrays
from glowflow.data.specs import DATASET_NAMES, SPECS, DatasetSpec
from glowflow.errors import GlowflowError

SPLITS = ("train", "test")
ALL = "all"  # every image of your own folder or .npz without splits of its own, unpartitioned
# Seconds any one socket operation may block during a library download.
DOWNLOAD_TIMEOUT_S = 15.0
Build = custom.Build  # build(data_root, download) -> Dataset


def dataset_info(name_or_path: str, image_size: Optional[int] = None, data_root: str = "./data") -> DatasetInfo:
    """Shape (after preprocessing), number of classes and label kind of a dataset.

    For the 13 names nothing is read from disk; a folder or .npz file is peeked at.
    """
    return _resolve(name_or_path, "train", image_size)[0]


def load_dataset(
    name_or_path: str,
    split: str,
    data_root: str = "./data",
    image_size: Optional[int] = None,
    download: bool = True,
    divisor: int = 1,
) -> Dataset:
    """The preprocessed ``split`` ("train" or "test") of a named dataset, folder or .npz file.

    "test" is the dataset's labelled evaluation split (val for Tiny-ImageNet, Places365 and
    ImageNet; a fixed held-out tenth of a folder or .npz without a test split of its own, whose
    training split is the rest). "all" is every image of such a folder or .npz.
    ``divisor`` (2**L) must divide the image size; that is checked before any image is
    read or resized. The result has ``.info`` (:class:`DatasetInfo`) and yields (float32 image
    (C, H, W) in [0, 1], label). Raises GlowflowError for anything the user can fix: an unknown
    name, a missing or unreadable file, a bad size.
    """
    if split not in SPLITS and split != ALL:
        raise GlowflowError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split == ALL and (name_or_path in SPECS or devsets.is_derived(name_or_path)):
        raise GlowflowError(f"{name_or_path}: the split 'all' is only for your own folders and .npz files")
    info, build = _resolve(name_or_path, split, image_size)
    if divisor < 1 or divisor & (divisor - 1):
        raise GlowflowError(f"divisor must be a power of two (2**L), got {divisor}")
    check_divisible(info.name, info.image_shape[1], divisor.bit_length() - 1)
    return build(data_root, download)


def check_divisible(name: str, size: int, L: int) -> None:
    """GlowflowError unless the image side ``size`` of the dataset ``name`` is divisible by 2**L
    (each of a model's L levels halves it), naming the fixes: the ``--image_size`` that resizes
    the images to the next multiple (e.g. 32 for 28x28 images and L=3, what the built-in 28-pixel
    sets get), or the largest ``--L`` that fits the size as it is."""
    divisor = 2**L
    if size % divisor == 0:
        return
    fits = (size & -size).bit_length() - 1  # the largest L with size % 2**L == 0
    target = -(-size // divisor) * divisor
    fixes = []
    if target <= MAX_IMAGE_SIZE:
        fixes.append(
            f"pass --image_size {target} to resize the images to {target}x{target} "
            f"(as the built-in 28-pixel sets are resized to 32)"
        )
    if 1 <= fits < L:
        fixes.append(f"use --L {fits} or less")
    fix = "; " + ", or ".join(fixes) if fixes else ""
    raise GlowflowError(f"{name}: image size {size} is not divisible by 2**L = {divisor} (--L {L}){fix}")


def load_scored_images(
    name_or_path: str, data_root: str = "./data", image_size: Optional[int] = None, divisor: int = 1
) -> Dataset:
    """The images an outlier set or ``--score`` is made of: the test split of a dataset that has
    one of its own, and every image of your own folder or .npz without one (none of them is
    trained on, so holding out a tenth would only drop images)."""
    dataset = load_dataset(name_or_path, "test", data_root, image_size, divisor=divisor)
    if getattr(dataset, "held_out_from", None) is not None:
        dataset = load_dataset(name_or_path, ALL, data_root, image_size, divisor=divisor)
    return dataset


def _resolve(name_or_path: str, split: str, image_size: Optional[int]) -> Tuple[DatasetInfo, Build]:
    """(DatasetInfo, build(data_root, download) -> dataset) without reading any image."""
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise GlowflowError(f"image_size must be a positive integer, got {image_size!r}")
    spec = SPECS.get(name_or_path)
    if spec is not None:
        return _named(name_or_path, spec, split, image_size)
    derived = devsets.parse_derived(name_or_path)
    if derived is not None:
        return _derived(derived, split, image_size)
    if name_or_path in devsets.SYNTHETIC:
        info = devsets.synthetic_info(name_or_path, image_size)
        return info, lambda data_root, download: devsets.synthetic_dataset(info, split)
    if not custom.looks_like_path(name_or_path):
        raise GlowflowError(
            f"unknown dataset {name_or_path!r}: use one of {', '.join(DATASET_NAMES)}, "
            f"or the path of an image folder or a .npz file"
        )
    return custom.custom_dataset(name_or_path, split, image_size)


def _named(name: str, spec: DatasetSpec, split: str, image_size: Optional[int]) -> Tuple[DatasetInfo, Build]:
    """One of the 13 names: in memory (resized once) or read from disk image by image."""
    size = image_size or spec.size
    info = DatasetInfo(name, (spec.channels, size, size), spec.num_classes, spec.multilabel)

    def build(data_root: str, download: bool) -> Dataset:
        raw = _locate(name, spec, split if split == "train" else spec.test_split, data_root, download)
        if isinstance(raw, Arrays):
            return ImageTensorDataset(square_resize(raw.images, size), raw.labels, info)
        return ImageFileDataset(raw, info)

    return info, build


def _derived(derived: devsets.DerivedName, split: str, image_size: Optional[int]) -> Tuple[DatasetInfo, Build]:
    """A class subset or flip: the base's info (its train split's) now, the base's ``split`` at build."""
    info = devsets.derived_info(derived, dataset_info(derived.base, image_size))

    def build(data_root: str, download: bool) -> Dataset:
        base = load_dataset(derived.base, split, data_root, image_size, download)
        return devsets.derive(derived, info, base, split)

    return info, build


def _locate(name: str, spec: DatasetSpec, split: str, data_root: str, download: bool):
    """The first source whose files are all there, read; else the library download into
    ``data_root``; else one GlowflowError naming every place tried."""
    tried = []
    for source in spec.sources:
        for folder in source.folders(data_root):
            missing = [p for p in source.files(folder, split) if not os.path.exists(p)]
            if missing:
                tried.append(f"{folder} (no {os.path.relpath(missing[0], folder)})")
                continue
            try:
                return source.read(folder, split, False)
            except GlowflowError:
                raise
            except Exception as e:
                raise GlowflowError(
                    f"{name}: the files in {folder} could not be read ({one_line(e)}); they may be corrupt "
                    f"or incomplete: replace them, or remove them to download again"
                ) from None
    if download:
        try:
            with _download_timeout():
                return spec.sources[0].read(data_root, split, True)
        except GlowflowError:
            raise
        except Exception as e:
            tried.append(f"download into {data_root} (failed: {one_line(e)})")
    else:
        tried.append("no download (download=False)")
    raise GlowflowError(
        f"{name} ({split} split) not found. Looked in: {'; '.join(tried)}. "
        f"Expected layout: {spec.layout.replace('{root}', data_root)}. "
        f"To get it offline: {spec.get.replace('{root}', data_root)}"
    )


@contextlib.contextmanager
def _download_timeout(seconds: float = DOWNLOAD_TIMEOUT_S):
    """Bound every socket operation of a library download, so no network means a quick failure."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)
