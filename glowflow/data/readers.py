"""Readers: one per on-disk format, each a thin call into torchvision or medmnist.

Formats: MNIST-style IDX (torchvision's layout), the original IDX .gz files, the CIFAR pickles,
SVHN's .mat, medmnist's .npz, and the Tiny-ImageNet, Places365, DTD and ImageNet image trees.
A reader takes (root, split, download) with split already mapped ("train", "test" or "val")
and returns either :class:`Arrays` (uint8 images (N, C, H, W) at the files' own size, labels)
or a dataset of (PIL image, int label). Local copies are trusted if they parse: checksums are
checked on download, not on load.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from glowflow.data.datasets import ImageList, list_images, open_image
from glowflow.errors import GlowflowError

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


def _cifar_class(base):
    """torchvision's CIFAR class reading local files without their md5 (checked on download)."""
    return type(
        "_" + base.__name__,
        (base,),
        {
            "train_list": [[name, None] for name, _ in base.train_list],
            "test_list": [[name, None] for name, _ in base.test_list],
            "meta": {**base.meta, "md5": None},
        },
    )


def read_cifar(cls_name: str, root: str, split: str, download: bool) -> Arrays:
    """torchvision's ``cls_name`` (CIFAR10, CIFAR100) under ``root``: images (N, 3, 32, 32)."""
    import torchvision.datasets as tvd

    ds = _cifar_class(getattr(tvd, cls_name))(root, train=split == "train", download=download)
    images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2)
    return Arrays(images, torch.as_tensor(ds.targets, dtype=torch.int64))


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
    """torchvision's DTD (partition 1) under ``root``."""
    from torchvision.datasets import DTD

    return DTD(root, split=split, partition=1, download=download)


def read_imagenet(root: str, split: str, download: bool) -> Dataset:
    """``root/imagenet/{split}/<wnid>/*.JPEG`` as an ImageFolder; never downloaded."""
    from torchvision.datasets import ImageFolder

    if download:
        raise RuntimeError("ImageNet has no automatic download (its licence needs a sign-in at image-net.org)")
    return ImageFolder(os.path.join(root, "imagenet", split), loader=open_image)
