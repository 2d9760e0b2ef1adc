"""The 13 named datasets: what each is, where its files may lie, and how to get them.

Preprocessing (that of GenerativeZoo's Glow script): the 28-pixel grey sets (MNIST, Fashion-MNIST, the MedMNIST sets at
their 28-pixel variant) are resized to 32x32x1; CIFAR-10/100 and SVHN are 32x32x3; Tiny-ImageNet
64x64x3; Places365 (small images), DTD and ImageNet 128x128x3 after a centre square crop.

Each :class:`DatasetSpec` in :data:`SPECS` lists its :class:`Source`: the folders a format may
be in (``data_root`` in torchvision's and medmnist's own layouts, then the places an OS package or
the library itself keeps them), the files that must exist there, and the reader; plus the expected
layout and how to get the files offline, quoted in the error when nothing is found.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Sequence, Tuple

from glowflow.data.readers import (
    CIFAR_FORMATS,
    TINY_IMAGENET_MD5,
    TINY_IMAGENET_URL,
    idx_prefix,
    read_cifar,
    read_dtd,
    read_idx_gz,
    read_imagenet,
    read_medmnist,
    read_mnist_like,
    read_places365,
    read_svhn,
    read_tinyimagenet,
    tiny_root,
)
from glowflow.names import DATASET_NAMES

# Where an OS package installs a dataset (folders of the original IDX .gz files).
SYSTEM_LOCATIONS = {"fashionmnist": ("/usr/share/datasets/fashion-mnist",)}
# medmnist's own default root: a user's earlier medmnist download is reused from there.
MEDMNIST_HOME = os.path.join("~", ".medmnist")
MEDMNIST_URL = "https://zenodo.org/records/10519652/files/{flag}.npz"


@dataclass(frozen=True)
class Source:
    """Places a dataset can be in one format: folders(data_root) (evaluated at each look-up),
    files(folder, split) that must exist there, and read(folder, split, download). The first
    source's first folder is data_root, where a library download goes."""

    folders: Callable[[str], Sequence[str]]
    files: Callable[[str, str], Sequence[str]]
    read: Callable[[str, str, bool], Any]


@dataclass(frozen=True)
class DatasetSpec:
    """A named dataset: images (channels, size, size) after preprocessing, its classes and sources."""

    channels: int
    size: int
    num_classes: int
    sources: Tuple[Source, ...]
    layout: str  # the expected layout, "{root}" standing for data_root
    get: str  # how to get the files offline, "{root}" standing for data_root
    test_split: str = "test"  # the labelled split used for evaluation and outlier detection
    multilabel: bool = False


def _data_root(root: str) -> Sequence[str]:
    return [root]


def _files(*paths: str) -> Callable[[str, str], Sequence[str]]:
    """Paths under a folder, "{split}" and "{idx}" (train / t10k) filled in for the split."""
    return lambda folder, split: [
        os.path.join(folder, *p.format(split=split, idx=idx_prefix(split)).split("/")) for p in paths
    ]


def _tiny_files(folder: str, split: str) -> Sequence[str]:
    base = tiny_root(folder)
    parts = ["train"] if split == "train" else ["val/images", "val/val_annotations.txt"]
    return [os.path.join(base, "wnids.txt")] + [os.path.join(base, *p.split("/")) for p in parts]


def _places_files(folder: str, split: str) -> Sequence[str]:
    own = (
        ["places365_train_standard.txt", "data_256_standard"] if split == "train" else ["places365_val.txt", "val_256"]
    )
    return [os.path.join(folder, f) for f in ["categories_places365.txt"] + own]


def _mnist_source(cls_name: str) -> Source:
    # torchvision's class wants all four files, whichever split is read
    names = [f"{cls_name}/raw/{p}-{k}-ubyte" for p in ("train", "t10k") for k in ("images-idx3", "labels-idx1")]
    return Source(_data_root, _files(*names), partial(read_mnist_like, cls_name))


def _cifar_spec(cls_name: str, classes: int) -> DatasetSpec:
    fmt = CIFAR_FORMATS[cls_name]
    files = [*fmt.train, *fmt.test, fmt.meta]
    return DatasetSpec(
        3,
        32,
        classes,
        (Source(_data_root, _files(*[f"{fmt.folder}/{f}" for f in files]), partial(read_cifar, cls_name)),),
        layout=f"{{root}}/{fmt.folder}/{{{','.join(files)}}} (torchvision's layout; Python pickles, read by "
        f"a restricted unpickler that refuses anything but arrays, lists, strings and numbers)",
        get=f"download {fmt.url} and extract it into {{root}}",
    )


def _medmnist_spec(flag: str, classes: int, multilabel: bool = False) -> DatasetSpec:
    files, read = _files(f"{flag}.npz"), partial(read_medmnist, flag)
    return DatasetSpec(
        1,
        32,
        classes,
        (Source(_data_root, files, read), Source(lambda root: [os.path.expanduser(MEDMNIST_HOME)], files, read)),
        layout=f"{{root}}/{flag}.npz (medmnist's 28-pixel file)",
        get=f"download {MEDMNIST_URL.format(flag=flag)} into {{root}}",
        multilabel=multilabel,
    )


_IDX_LAYOUT = "{root}/%s/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte (torchvision's layout)"

SPECS = {
    "mnist": DatasetSpec(
        1,
        32,
        10,
        (_mnist_source("MNIST"),),
        layout=_IDX_LAYOUT % "MNIST",
        get="download the four .gz files from https://ossci-datasets.s3.amazonaws.com/mnist/ into "
        "{root}/MNIST/raw/ and gunzip them",
    ),
    "fashionmnist": DatasetSpec(
        1,
        32,
        10,
        (
            _mnist_source("FashionMNIST"),
            Source(
                lambda root: SYSTEM_LOCATIONS.get("fashionmnist", ()),
                _files("{idx}-images-idx3-ubyte.gz", "{idx}-labels-idx1-ubyte.gz"),
                read_idx_gz,
            ),
        ),
        layout=_IDX_LAYOUT % "FashionMNIST",
        get="`apt-get install dataset-fashion-mnist` (Debian/Ubuntu; installs /usr/share/datasets/fashion-mnist), "
        "or download the four .gz files from http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/ into "
        "{root}/FashionMNIST/raw/ and gunzip them",
    ),
    "cifar10": _cifar_spec("CIFAR10", 10),
    "cifar100": _cifar_spec("CIFAR100", 100),
    "svhn": DatasetSpec(
        3,
        32,
        10,
        (Source(_data_root, _files("{split}_32x32.mat"), read_svhn),),
        layout="{root}/{train,test}_32x32.mat (torchvision's layout)",
        get="download http://ufldl.stanford.edu/housenumbers/train_32x32.mat and test_32x32.mat into {root}",
    ),
    "chestmnist": _medmnist_spec("chestmnist", 14, multilabel=True),
    "octmnist": _medmnist_spec("octmnist", 4),
    "tissuemnist": _medmnist_spec("tissuemnist", 8),
    "pneumoniamnist": _medmnist_spec("pneumoniamnist", 2),
    "tinyimagenet": DatasetSpec(
        3,
        64,
        200,
        (Source(_data_root, _tiny_files, read_tinyimagenet),),
        layout="{root}/tiny-imagenet-200/{wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG, "
        "val/val_annotations.txt}",
        get=f"download {TINY_IMAGENET_URL} (md5 {TINY_IMAGENET_MD5}) and unzip it into {{root}}",
        test_split="val",
    ),
    "places365": DatasetSpec(
        3,
        128,
        365,
        (Source(_data_root, _places_files, read_places365),),
        layout="{root}/{categories_places365.txt, places365_train_standard.txt, places365_val.txt, "
        "data_256_standard/, val_256/} (torchvision's layout, small images)",
        get="download filelist_places365-standard.tar, train_256_places365standard.tar and val_256.tar from "
        "http://data.csail.mit.edu/places/places365/ and extract them into {root}, renaming data_256/ to "
        "data_256_standard/",
        test_split="val",
    ),
    "dtd": DatasetSpec(
        3,
        128,
        47,
        (Source(_data_root, _files("dtd/dtd/images", "dtd/dtd/labels/{split}1.txt"), read_dtd),),
        layout="{root}/dtd/dtd/{images/<class>/*.jpg, labels/{train,val,test}1.txt} (torchvision's layout)",
        get="download https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz and extract it "
        "into {root}/dtd",
    ),
    "imagenet": DatasetSpec(
        3,
        128,
        1000,
        (Source(_data_root, _files("imagenet/{split}"), read_imagenet),),
        layout="{root}/imagenet/{train,val}/<wnid>/*.JPEG (torchvision's ImageNet layout, read as an ImageFolder)",
        get="get ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz from "
        "https://image-net.org/download-images.php into {root}/imagenet and unpack them once with "
        "torchvision.datasets.ImageNet('{root}/imagenet', split='train') and split='val'",
        test_split="val",
    ),
}
assert set(SPECS) == set(DATASET_NAMES)
