"""Readers: one per on-disk format, each a thin call into torchvision or medmnist, except CIFAR's.

Formats: MNIST-style IDX (torchvision's layout), the original IDX .gz files, the CIFAR pickles,
SVHN's .mat, medmnist's .npz, and the Tiny-ImageNet, Places365, DTD and ImageNet image trees.
The CIFAR pickles are read here by a restricted unpickler that admits only numpy arrays, lists,
strings and numbers (:func:`load_cifar_pickle`): a crafted file is refused, never run;
torchvision only downloads their archive.
A reader takes (root, split, download) with split already mapped ("train", "test" or "val")
and returns either :class:`Arrays` (uint8 images (N, C, H, W) at the files' own size, labels)
or a dataset of (PIL image, int label). Local copies are trusted if they parse: checksums are
checked on download, not on load.
"""

from __future__ import annotations

import _codecs
import builtins
import os
import pickle
import tempfile
from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from glowflow.data.datasets import ImageList, list_images, one_line, open_image
from glowflow.errors import GlowflowError

try:  # numpy 2; numpy 1 keeps the same functions under numpy.core
    from numpy._core import multiarray, numeric
except ImportError:
    from numpy.core import multiarray, numeric

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"


@dataclass
class Arrays:
    """A whole split in memory: images uint8 (N, C, H, W); labels int64 (N,) or float32 (N, K)."""

    images: torch.Tensor
    labels: torch.Tensor


def idx_prefix(split: str) -> str:
    """The IDX file names' split prefix: "train" or "t10k"."""
    return "train" if split == "train" else "t10k"


def read_mnist_like(cls_name: str, root: str, split: str, download: bool) -> Arrays:
    """torchvision's ``cls_name`` (MNIST, FashionMNIST) under ``root``: images (N, 1, 28, 28)."""
    import torchvision.datasets as tvd

    ds = getattr(tvd, cls_name)(root, train=split == "train", download=download)
    return Arrays(ds.data.unsqueeze(1), ds.targets.long())


def read_idx_gz(folder: str, split: str, download: bool) -> Arrays:
    """The original IDX .gz files in one folder (Debian's dataset-fashion-mnist layout).

    torchvision's IDX reader needs plain files, so the split's two files are unpacked into a
    temporary folder, read, and the folder removed: nothing is written under data_root.
    """
    from torchvision.datasets.mnist import read_image_file, read_label_file
    from torchvision.datasets.utils import extract_archive

    prefix = idx_prefix(split)
    with tempfile.TemporaryDirectory(prefix="glowflow-idx-") as tmp:
        images = read_image_file(extract_archive(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"), tmp))
        labels = read_label_file(extract_archive(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"), tmp))
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    return Arrays(images.unsqueeze(1), labels.long())


@dataclass(frozen=True)
class CifarFormat:
    """One CIFAR variant's files: ``folder`` under data_root, the ``train`` and ``test`` batch
    files, the ``meta`` file (whose ``meta_key`` lists the class names), the batches' label key,
    and the official archive (``url``, ``md5``) a download fetches into data_root."""

    folder: str
    train: Tuple[str, ...]
    test: Tuple[str, ...]
    meta: str
    meta_key: str
    label_key: str
    url: str
    md5: str


CIFAR_FORMATS = {
    "CIFAR10": CifarFormat(
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "batches.meta",
        "label_names",
        "labels",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
    ),
    "CIFAR100": CifarFormat(
        "cifar-100-python",
        ("train",),
        ("test",),
        "meta",
        "fine_label_names",
        "fine_labels",
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
    ),
}
CIFAR_PIXELS = 3 * 32 * 32


def _cifar_globals() -> dict:
    """The only globals a CIFAR pickle may name, each mapped to the object it gets: numpy's array
    and scalar reconstruction (under numpy 1's ``numpy.core`` and numpy 2's ``numpy._core``
    names, the protocol-5 ``_frombuffer`` included), ``numpy.ndarray`` and ``numpy.dtype``, the
    builtin containers and numbers, and ``_codecs.encode`` (how pickle protocols 0-2 store
    bytes). None of them runs anything but building arrays, strings and numbers."""
    found = {}
    for package in ("numpy.core", "numpy._core"):
        found[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        found[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        found[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    found[("numpy", "ndarray")] = np.ndarray
    found[("numpy", "dtype")] = np.dtype
    for name in (
        "bytes",
        "bytearray",
        "str",
        "int",
        "float",
        "complex",
        "bool",
        "dict",
        "list",
        "tuple",
        "set",
        "frozenset",
    ):
        found[("builtins", name)] = getattr(builtins, name)
    found[("_codecs", "encode")] = _codecs.encode
    return found


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a global that CIFAR's files never hold."""


class _CifarUnpickler(pickle.Unpickler):
    """pickle's Unpickler that resolves only :func:`_cifar_globals`: anything else (``os.system``,
    ``builtins.eval``, any class) stops the load before it is called."""

    def __init__(self, file):
        super().__init__(file, encoding="latin1")  # the real files are Python 2 pickles
        self._allowed = _cifar_globals()

    def find_class(self, module, name):
        found = self._allowed.get((module, name))
        if found is None:
            raise _RefusedGlobal(f"{module}.{name}")
        return found

    def persistent_load(self, pid):
        raise _RefusedGlobal("a persistent id")


def load_cifar_pickle(path: str):
    """The object pickled in the CIFAR file at ``path``, read by :class:`_CifarUnpickler`;
    a GlowflowError naming the file if it holds anything else or cannot be read."""
    try:
        with open(path, "rb") as f:
            return _CifarUnpickler(f).load()
    except _RefusedGlobal as e:
        raise GlowflowError(
            f"{path} is not a CIFAR file and was not loaded: its pickle asks for {e}, which CIFAR's "
            f"files never hold (only numpy arrays, lists, strings and numbers); a crafted file could "
            f"run code this way: replace it with a copy from the official archive"
        ) from None
    except Exception as e:  # a truncated or foreign file: pickle raises many kinds
        raise GlowflowError(f"cannot read {path} as a CIFAR pickle ({one_line(e)}); it may be corrupt") from None


def _entry(batch: dict, key: str):
    """``batch[key]``, the key as str (the real Python 2 files read with latin1) or bytes."""
    if key in batch:
        return batch[key]
    return batch.get(key.encode("ascii"))


def _read_cifar_batch(path: str, label_key: str) -> Tuple[np.ndarray, np.ndarray]:
    """One batch file: uint8 images (N, 3, 32, 32) and int64 labels (N,)."""
    batch = load_cifar_pickle(path)
    data = _entry(batch, "data") if isinstance(batch, dict) else None
    labels = _entry(batch, label_key) if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != CIFAR_PIXELS:
        got = f"{data.dtype} array {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise GlowflowError(
            f"{path}: expected a dict whose 'data' is a uint8 array (N, {CIFAR_PIXELS}), got {got}; "
            f"it is not a CIFAR batch"
        )
    try:
        labels = np.asarray(labels)
    except Exception:
        labels = np.asarray(None)
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise GlowflowError(
            f"{path}: expected {len(data)} integer labels under '{label_key}', got {labels.dtype} {labels.shape}; "
            f"it is not a CIFAR batch"
        )
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def read_cifar(cls_name: str, root: str, split: str, download: bool) -> Arrays:
    """CIFAR's Python pickles (``cls_name`` CIFAR10 or CIFAR100) under ``root``: images
    (N, 3, 32, 32) in the files' order.

    The pickles are read here by a restricted unpickler (:func:`load_cifar_pickle`), never by
    torchvision, so a crafted file cannot run code. A download fetches the official archive with
    torchvision's utilities, md5-checked, into ``root`` and extracts it there."""
    fmt = CIFAR_FORMATS[cls_name]
    if download:
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(fmt.url, root, filename=os.path.basename(fmt.url), md5=fmt.md5)
    folder = os.path.join(root, fmt.folder)
    meta_path = os.path.join(folder, fmt.meta)
    meta = load_cifar_pickle(meta_path)
    if not isinstance(meta, dict) or _entry(meta, fmt.meta_key) is None:
        raise GlowflowError(f"{meta_path}: expected a dict with '{fmt.meta_key}'; it is not CIFAR's meta file")
    batches = [
        _read_cifar_batch(os.path.join(folder, name), fmt.label_key)
        for name in (fmt.train if split == "train" else fmt.test)
    ]
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    return Arrays(torch.from_numpy(images), torch.from_numpy(labels))


def read_svhn(root: str, split: str, download: bool) -> Arrays:
    """SVHN's ``{split}_32x32.mat`` under ``root``: images (N, 3, 32, 32)."""
    from torchvision.datasets import SVHN

    class _SVHN(SVHN):  # local files are trusted if they parse; download keeps its md5
        def _check_integrity(self) -> bool:
            return os.path.isfile(os.path.join(self.root, self.filename))

    ds = _SVHN(root, split=split, download=download)
    return Arrays(torch.from_numpy(np.ascontiguousarray(ds.data)), torch.from_numpy(ds.labels).long())


def read_medmnist(flag: str, root: str, split: str, download: bool) -> Arrays:
    """medmnist's 28-pixel ``{flag}.npz`` under ``root``: images (N, 1, 28, 28); ChestMNIST's
    labels float32 multi-hot (N, 14), the others int64 (N,)."""
    try:
        import medmnist
    except ImportError:
        raise GlowflowError(f"{flag} needs the medmnist package: pip install medmnist") from None
    if download:
        os.makedirs(root, exist_ok=True)  # medmnist refuses a root that does not exist
    ds = getattr(medmnist, medmnist.INFO[flag]["python_class"])(split=split, root=root, size=28, download=download)
    images = torch.from_numpy(np.ascontiguousarray(ds.imgs))
    if images.dim() == 3:
        images = images.unsqueeze(1)
    labels = np.asarray(ds.labels)
    if flag == "chestmnist":
        return Arrays(images, torch.from_numpy(labels).float())
    return Arrays(images, torch.from_numpy(labels.reshape(len(labels))).long())


def tiny_root(root: str) -> str:
    """The folder the Tiny-ImageNet zip unpacks to under ``root``."""
    return os.path.join(root, "tiny-imagenet-200")


def read_tinyimagenet(root: str, split: str, download: bool) -> Dataset:
    """Tiny-ImageNet's tree under ``root`` ("train" or "val"); a download is md5-checked."""
    base = tiny_root(root)
    if download and not os.path.isdir(base):
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(TINY_IMAGENET_URL, download_root=root, md5=TINY_IMAGENET_MD5)
    with open(os.path.join(base, "wnids.txt")) as f:
        wnids = sorted(line.strip() for line in f if line.strip())
    class_index = {wnid: i for i, wnid in enumerate(wnids)}
    if split == "train":
        samples = [
            (path, class_index[wnid]) for wnid in wnids for path in list_images(os.path.join(base, "train", wnid))
        ]
    else:  # val: the labels are in val_annotations.txt (file, wnid, box), not in the folder tree
        samples = []
        with open(os.path.join(base, "val", "val_annotations.txt")) as f:
            for line in f:
                fields = line.split()
                if fields:
                    samples.append((os.path.join(base, "val", "images", fields[0]), class_index[fields[1]]))
    return ImageList(samples)


def read_places365(root: str, split: str, download: bool) -> Dataset:
    """torchvision's Places365 (small images) under ``root``: "train" (train-standard) or "val"."""
    from torchvision.datasets import Places365

    class _Places365(Places365):  # local files are trusted if they parse; download keeps its md5
        def _check_integrity(self, file, md5, download):
            return super()._check_integrity(file, None, download)

    ds = _Places365(root, split="train-standard" if split == "train" else "val", small=True, download=download)
    return ImageList(ds.imgs)  # (path, class index) pairs; a plain list pickles into DataLoader workers


def read_dtd(root: str, split: str, download: bool) -> Dataset:
    """torchvision's DTD (partition 1) under ``root``: its file list, each image opened by
    :func:`open_image` (PIL's pixel limit enforced)."""
    from torchvision.datasets import DTD

    ds = DTD(root, split=split, partition=1, download=download)
    return ImageList([(str(path), label) for path, label in zip(ds._image_files, ds._labels)])


def read_imagenet(root: str, split: str, download: bool) -> Dataset:
    """``root/imagenet/{split}/<wnid>/*.JPEG`` as an ImageFolder; never downloaded."""
    from torchvision.datasets import ImageFolder

    if download:
        raise RuntimeError("ImageNet has no automatic download (its licence needs a sign-in at image-net.org)")
    return ImageFolder(os.path.join(root, "imagenet", split), loader=open_image)
