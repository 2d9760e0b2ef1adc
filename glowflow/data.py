"""Datasets: the seed's 13 names and the user's own image folders and .npz files.

Every dataset yields ``(image, label)``: ``image`` a float32 tensor (C, H, W) in [0, 1] equal to
torchvision's ``ToTensor`` of the preprocessed uint8 pixels (so ``round(image * 255)`` gives the
pixels back exactly), ``label`` an int64 scalar (a float32 multi-hot vector for ChestMNIST).

Preprocessing (the seed's): the 28-pixel grey sets (MNIST, Fashion-MNIST, the MedMNIST sets at
their 28-pixel variant) are resized to 32x32x1; CIFAR-10/100 and SVHN are 32x32x3; Tiny-ImageNet
64x64x3; Places365 (small images), DTD and ImageNet 128x128x3 after a centre square crop.
``image_size`` overrides the side. Resizing is torchvision's bilinear ``Resize`` of the PIL image;
for the in-memory sets it runs once, when the dataset is loaded, not at every item read.

Where the files come from, in order: ``data_root`` in torchvision's and medmnist's own layouts
(so an existing download is reused); the places an OS package or the library itself keeps them
(Debian's ``dataset-fashion-mnist`` in /usr/share/datasets/fashion-mnist, medmnist's ~/.medmnist);
then the library's own download into ``data_root`` (with a short socket timeout). When all fail,
one :class:`GlowflowError` names every place looked at, the layout expected and how to get the
files. Local copies are trusted if they parse: checksums are checked on download, not on load.
"""
from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import zipfile
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Callable, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from glowflow import devsets
from glowflow.errors import GlowflowError

DATASET_NAMES = (
    "mnist", "fashionmnist", "cifar10", "cifar100", "svhn",
    "chestmnist", "octmnist", "tissuemnist", "pneumoniamnist",
    "tinyimagenet", "places365", "dtd", "imagenet",
)
SPLITS = ("train", "test")

# Where an OS package installs a dataset (folders of the original IDX .gz files).
SYSTEM_LOCATIONS = {"fashionmnist": ("/usr/share/datasets/fashion-mnist",)}
# medmnist's own default root: a user's earlier medmnist download is reused from there.
MEDMNIST_HOME = os.path.join("~", ".medmnist")
MEDMNIST_URL = "https://zenodo.org/records/10519652/files/{flag}.npz"
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
# Seconds any one socket operation may block during a library download.
DOWNLOAD_TIMEOUT_S = 15.0

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class DatasetInfo:
    """What the model needs to know: image_shape is (C, H, W) after preprocessing."""

    name: str
    image_shape: Tuple[int, int, int]
    num_classes: int
    multilabel: bool = False


# --------------------------------------------------------------------------------------------
# Datasets returned to the caller


class ImageTensorDataset(Dataset):
    """Preprocessed uint8 images (N, C, H, W) held in memory, with their labels.

    labels: int64 (N,), or float32 (N, K) multi-hot. Items are (float32 image in [0, 1], label).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo):
        assert images.dtype == torch.uint8 and images.dim() == 4, (images.dtype, images.shape)
        assert len(images) == len(labels)
        self.images, self.labels, self.info = images, labels, info

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i].float().div_(255), self.labels[i]

    def __getitems__(self, indices):
        """The items at ``indices`` from one gather: DataLoader calls this once per batch instead
        of ``__getitem__`` per image (benchmarks/README.md has the timing). Still a list of
        (image, label), so any collate function works."""
        index = torch.as_tensor(indices, dtype=torch.int64)
        return list(zip(self.images[index].float().div_(255).unbind(0), self.labels[index].unbind(0)))


class ImageFileDataset(Dataset):
    """Images read from disk on demand: ``base[i]`` gives (PIL image, int label).

    Each image is converted to the dataset's mode ('L' or 'RGB'), centre-cropped to a square,
    resized to (size, size) with torchvision's ``Resize`` and turned into a tensor (``ToTensor``).
    """

    def __init__(self, base: Dataset, info: DatasetInfo):
        self.base, self.info = base, info
        self.preprocess = _Preprocess(info.image_shape[1], "L" if info.image_shape[0] == 1 else "RGB")

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        try:
            image, label = self.base[i]
        except GlowflowError:
            raise
        except (OSError, ValueError) as e:  # PIL's "cannot identify image file", truncated files
            raise GlowflowError(f"{self.info.name}: cannot read image {i}: {_one_line(e)}") from None
        return self.preprocess(image), torch.tensor(label, dtype=torch.int64)


class _Preprocess:
    """PIL image -> mode ('L' or 'RGB') -> centre square crop -> resize -> ToTensor."""

    def __init__(self, size: int, mode: str):
        self.size, self.mode = size, mode

    def __call__(self, image):
        from torchvision.transforms.functional import to_tensor

        return to_tensor(_square(image.convert(self.mode), self.size))


def _square(image, size: int):
    """PIL image -> its centre square (torchvision's CenterCrop to the shorter side) -> bilinear
    resize to (size, size): what torchvision's Resize does to a PIL image."""
    from PIL import Image
    from torchvision.transforms.functional import center_crop

    side = min(image.size)
    if image.size != (side, side):
        image = center_crop(image, [side, side])
    return image if side == size else image.resize((size, size), Image.BILINEAR)


class _ImageList(Dataset):
    """(path, label) pairs -> (PIL image, label); the minimal ImageFolder for any file list."""

    def __init__(self, samples: Sequence[Tuple[str, int]]):
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return _open_image(path), label


def _open_image(path: str):
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, ValueError) as e:
        raise GlowflowError(f"cannot read image {path}: {_one_line(e)}") from None


# --------------------------------------------------------------------------------------------
# Readers: one per on-disk format, each a thin call into torchvision or medmnist.
# A reader takes (root, split, download) with split already mapped ("train", "test" or "val")
# and returns either _Arrays (uint8 images (N, C, H, W), labels) or a dataset of (PIL image, int).


@dataclass
class _Arrays:
    images: torch.Tensor
    labels: torch.Tensor


def _idx_prefix(split: str) -> str:
    return "train" if split == "train" else "t10k"


def _read_mnist_like(cls_name: str, root: str, split: str, download: bool) -> _Arrays:
    import torchvision.datasets as tvd

    ds = getattr(tvd, cls_name)(root, train=split == "train", download=download)
    return _Arrays(ds.data.unsqueeze(1), ds.targets.long())


def _read_idx_gz(folder: str, split: str, download: bool) -> _Arrays:
    """The original IDX .gz files in one folder (Debian's dataset-fashion-mnist layout).

    torchvision's IDX reader needs plain files, so the split's two files are unpacked into a
    temporary folder, read, and the folder removed: nothing is written under data_root.
    """
    from torchvision.datasets.mnist import read_image_file, read_label_file
    from torchvision.datasets.utils import extract_archive

    prefix = _idx_prefix(split)
    with tempfile.TemporaryDirectory(prefix="glowflow-idx-") as tmp:
        images = read_image_file(extract_archive(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"), tmp))
        labels = read_label_file(extract_archive(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"), tmp))
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    return _Arrays(images.unsqueeze(1), labels.long())


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


def _read_cifar(cls_name: str, root: str, split: str, download: bool) -> _Arrays:
    import torchvision.datasets as tvd

    ds = _cifar_class(getattr(tvd, cls_name))(root, train=split == "train", download=download)
    images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2)
    return _Arrays(images, torch.as_tensor(ds.targets, dtype=torch.int64))


def _read_svhn(root: str, split: str, download: bool) -> _Arrays:
    from torchvision.datasets import SVHN

    class _SVHN(SVHN):  # local files are trusted if they parse; download keeps its md5
        def _check_integrity(self) -> bool:
            return os.path.isfile(os.path.join(self.root, self.filename))

    ds = _SVHN(root, split=split, download=download)
    return _Arrays(torch.from_numpy(np.ascontiguousarray(ds.data)), torch.from_numpy(ds.labels).long())


def _read_medmnist(flag: str, root: str, split: str, download: bool) -> _Arrays:
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
        return _Arrays(images, torch.from_numpy(labels).float())
    return _Arrays(images, torch.from_numpy(labels.reshape(len(labels))).long())


def _tiny_root(root: str) -> str:
    return os.path.join(root, "tiny-imagenet-200")


def _read_tinyimagenet(root: str, split: str, download: bool) -> Dataset:
    base = _tiny_root(root)
    if download and not os.path.isdir(base):
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(TINY_IMAGENET_URL, download_root=root, md5=TINY_IMAGENET_MD5)
    with open(os.path.join(base, "wnids.txt")) as f:
        wnids = sorted(line.strip() for line in f if line.strip())
    class_index = {wnid: i for i, wnid in enumerate(wnids)}
    if split == "train":
        samples = [
            (path, class_index[wnid])
            for wnid in wnids
            for path in _list_images(os.path.join(base, "train", wnid))
        ]
    else:  # val: the labels are in val_annotations.txt (file, wnid, box), not in the folder tree
        samples = []
        with open(os.path.join(base, "val", "val_annotations.txt")) as f:
            for line in f:
                fields = line.split()
                if fields:
                    samples.append((os.path.join(base, "val", "images", fields[0]), class_index[fields[1]]))
    return _ImageList(samples)


def _read_places365(root: str, split: str, download: bool) -> Dataset:
    from torchvision.datasets import Places365

    class _Places365(Places365):  # local files are trusted if they parse; download keeps its md5
        def _check_integrity(self, file, md5, download):
            return super()._check_integrity(file, None, download)

    ds = _Places365(root, split="train-standard" if split == "train" else "val", small=True, download=download)
    return _ImageList(ds.imgs)  # (path, class index) pairs; a plain list pickles into DataLoader workers


def _read_dtd(root: str, split: str, download: bool) -> Dataset:
    from torchvision.datasets import DTD

    return DTD(root, split=split, partition=1, download=download)


def _read_imagenet(root: str, split: str, download: bool) -> Dataset:
    from torchvision.datasets import ImageFolder

    if download:
        raise RuntimeError("ImageNet has no automatic download (its licence needs a sign-in at image-net.org)")
    return ImageFolder(os.path.join(root, "imagenet", split), loader=_open_image)


# --------------------------------------------------------------------------------------------
# The registry: what each name is, where its files lie, how to get them


@dataclass(frozen=True)
class _Source:
    """Places a dataset can be in one format: folders(data_root) (evaluated at each look-up),
    files(folder, split) that must exist there, and read(folder, split, download). The first
    source's first folder is data_root, where a library download goes."""

    folders: Callable[[str], Sequence[str]]
    files: Callable[[str, str], Sequence[str]]
    read: Callable[[str, str, bool], Any]


@dataclass(frozen=True)
class _Spec:
    channels: int
    size: int
    num_classes: int
    sources: Tuple[_Source, ...]
    layout: str  # the expected layout, "{root}" standing for data_root
    get: str  # how to get the files offline, "{root}" standing for data_root
    test_split: str = "test"  # the labelled split used for evaluation and outlier detection
    multilabel: bool = False


def _data_root(root: str) -> Sequence[str]:
    return [root]


def _files(*paths: str) -> Callable[[str, str], Sequence[str]]:
    """Paths under a folder, "{split}" and "{idx}" (train / t10k) filled in for the split."""
    return lambda folder, split: [
        os.path.join(folder, *p.format(split=split, idx=_idx_prefix(split)).split("/")) for p in paths
    ]


def _tiny_files(folder: str, split: str) -> Sequence[str]:
    base = _tiny_root(folder)
    parts = ["train"] if split == "train" else ["val/images", "val/val_annotations.txt"]
    return [os.path.join(base, "wnids.txt")] + [os.path.join(base, *p.split("/")) for p in parts]


def _places_files(folder: str, split: str) -> Sequence[str]:
    own = ["places365_train_standard.txt", "data_256_standard"] if split == "train" else ["places365_val.txt", "val_256"]
    return [os.path.join(folder, f) for f in ["categories_places365.txt"] + own]


def _mnist_source(cls_name: str) -> _Source:
    # torchvision's class wants all four files, whichever split is read
    names = [f"{cls_name}/raw/{p}-{k}-ubyte" for p in ("train", "t10k") for k in ("images-idx3", "labels-idx1")]
    return _Source(_data_root, _files(*names), partial(_read_mnist_like, cls_name))


def _cifar_spec(cls_name: str, folder: str, files: Sequence[str], classes: int, archive: str) -> _Spec:
    return _Spec(
        3, 32, classes,
        (_Source(_data_root, _files(*[f"{folder}/{f}" for f in files]), partial(_read_cifar, cls_name)),),
        layout=f"{{root}}/{folder}/{{{','.join(files)}}} (torchvision's layout; Python pickles, which "
        f"torchvision unpickles: use trusted copies only)",
        get=f"download https://www.cs.toronto.edu/~kriz/{archive} and extract it into {{root}}",
    )


def _medmnist_spec(flag: str, classes: int, multilabel: bool = False) -> _Spec:
    files, read = _files(f"{flag}.npz"), partial(_read_medmnist, flag)
    return _Spec(
        1, 32, classes,
        (_Source(_data_root, files, read), _Source(lambda root: [os.path.expanduser(MEDMNIST_HOME)], files, read)),
        layout=f"{{root}}/{flag}.npz (medmnist's 28-pixel file)",
        get=f"download {MEDMNIST_URL.format(flag=flag)} into {{root}}",
        multilabel=multilabel,
    )


_IDX_LAYOUT = "{root}/%s/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte (torchvision's layout)"

_SPECS = {
    "mnist": _Spec(
        1, 32, 10, (_mnist_source("MNIST"),),
        layout=_IDX_LAYOUT % "MNIST",
        get="download the four .gz files from https://ossci-datasets.s3.amazonaws.com/mnist/ into "
        "{root}/MNIST/raw/ and gunzip them",
    ),
    "fashionmnist": _Spec(
        1, 32, 10,
        (_mnist_source("FashionMNIST"),
         _Source(lambda root: SYSTEM_LOCATIONS.get("fashionmnist", ()),
                 _files("{idx}-images-idx3-ubyte.gz", "{idx}-labels-idx1-ubyte.gz"), _read_idx_gz)),
        layout=_IDX_LAYOUT % "FashionMNIST",
        get="`apt-get install dataset-fashion-mnist` (Debian/Ubuntu; installs /usr/share/datasets/fashion-mnist), "
        "or download the four .gz files from http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/ into "
        "{root}/FashionMNIST/raw/ and gunzip them",
    ),
    "cifar10": _cifar_spec(
        "CIFAR10", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"], 10,
        "cifar-10-python.tar.gz",
    ),
    "cifar100": _cifar_spec("CIFAR100", "cifar-100-python", ["train", "test", "meta"], 100, "cifar-100-python.tar.gz"),
    "svhn": _Spec(
        3, 32, 10, (_Source(_data_root, _files("{split}_32x32.mat"), _read_svhn),),
        layout="{root}/{train,test}_32x32.mat (torchvision's layout)",
        get="download http://ufldl.stanford.edu/housenumbers/train_32x32.mat and test_32x32.mat into {root}",
    ),
    "chestmnist": _medmnist_spec("chestmnist", 14, multilabel=True),
    "octmnist": _medmnist_spec("octmnist", 4),
    "tissuemnist": _medmnist_spec("tissuemnist", 8),
    "pneumoniamnist": _medmnist_spec("pneumoniamnist", 2),
    "tinyimagenet": _Spec(
        3, 64, 200, (_Source(_data_root, _tiny_files, _read_tinyimagenet),),
        layout="{root}/tiny-imagenet-200/{wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG, "
        "val/val_annotations.txt}",
        get=f"download {TINY_IMAGENET_URL} (md5 {TINY_IMAGENET_MD5}) and unzip it into {{root}}",
        test_split="val",
    ),
    "places365": _Spec(
        3, 128, 365, (_Source(_data_root, _places_files, _read_places365),),
        layout="{root}/{categories_places365.txt, places365_train_standard.txt, places365_val.txt, "
        "data_256_standard/, val_256/} (torchvision's layout, small images)",
        get="download filelist_places365-standard.tar, train_256_places365standard.tar and val_256.tar from "
        "http://data.csail.mit.edu/places/places365/ and extract them into {root}, renaming data_256/ to "
        "data_256_standard/",
        test_split="val",
    ),
    "dtd": _Spec(
        3, 128, 47, (_Source(_data_root, _files("dtd/dtd/images", "dtd/dtd/labels/{split}1.txt"), _read_dtd),),
        layout="{root}/dtd/dtd/{images/<class>/*.jpg, labels/{train,val,test}1.txt} (torchvision's layout)",
        get="download https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz and extract it "
        "into {root}/dtd",
    ),
    "imagenet": _Spec(
        3, 128, 1000, (_Source(_data_root, _files("imagenet/{split}"), _read_imagenet),),
        layout="{root}/imagenet/{train,val}/<wnid>/*.JPEG (torchvision's ImageNet layout, read as an ImageFolder)",
        get="get ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz from "
        "https://image-net.org/download-images.php into {root}/imagenet and unpack them once with "
        "torchvision.datasets.ImageNet('{root}/imagenet', split='train') and split='val'",
        test_split="val",
    ),
}
assert set(_SPECS) == set(DATASET_NAMES)


# --------------------------------------------------------------------------------------------
# Public API


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
    ImageNet). ``divisor`` (2**L) must divide the image size; that is checked before any image is
    read or resized. The result has ``.info`` (:class:`DatasetInfo`). Raises GlowflowError for
    anything the user can fix: an unknown name, a missing or unreadable file, a bad size.
    """
    if split not in SPLITS:
        raise GlowflowError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    info, build = _resolve(name_or_path, split, image_size)
    size = info.image_shape[1]
    if divisor < 1 or size % divisor:
        raise GlowflowError(
            f"{info.name}: image size {size} is not divisible by 2**L = {divisor}; "
            f"pass --image_size with a multiple of {divisor} or use a smaller --L"
        )
    return build(data_root, download)


def match_shape(dataset: Dataset, image_shape: Sequence[int]) -> Dataset:
    """``dataset`` yielding images of ``image_shape`` (C, H, W): grey replicated to RGB, RGB to
    luminance (PIL's ITU-R 601-2 weights, on the uint8 pixels), then resized. A one-line note is
    printed when something changes; a dataset already of that shape is returned as it is."""
    target = tuple(int(s) for s in image_shape)
    info = getattr(dataset, "info", None)
    source = tuple(info.image_shape) if info is not None else tuple(dataset[0][0].shape)
    if source == target:
        return dataset
    if target[1] != target[2]:
        raise GlowflowError(f"image_shape must be square (C, S, S), got {target}")
    if source[0] != target[0] and {source[0], target[0]} != {1, 3}:
        raise GlowflowError(f"cannot convert {source[0]}-channel images to {target[0]} channels")
    name = info.name if info is not None else "outlier dataset"
    how = []
    if source[0] != target[0]:
        how.append("grey replicated to RGB" if target[0] == 3 else "RGB to luminance")
    if source[1:] != target[1:]:
        how.append(f"resized {source[1]}x{source[2]} -> {target[1]}x{target[2]}")
    print(f"note: {name} images are {'x'.join(map(str, source))}, the in-distribution images "
          f"{'x'.join(map(str, target))}: {name} converted ({', '.join(how)})")
    new_info = replace(info, image_shape=target) if info is not None else DatasetInfo(name, target, 1)
    return _Reshaped(dataset, target, new_info)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    seed: int = 0,
    device="cpu",
    drop_last: bool = False,
    sampler=None,
) -> DataLoader:
    """A DataLoader with a seeded generator (same order for the same seed), pinned memory only
    when ``device`` is CUDA. With a ``sampler`` the sampler decides the order."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        generator=generator,
        pin_memory=torch.device(device).type == "cuda",
        drop_last=drop_last,
    )


# --------------------------------------------------------------------------------------------
# Finding the files


def _resolve(name_or_path: str, split: str, image_size: Optional[int]):
    """(DatasetInfo, build(data_root, download) -> dataset) without reading any image."""
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise GlowflowError(f"image_size must be a positive integer, got {image_size!r}")
    spec = _SPECS.get(name_or_path)
    if spec is None and devsets.is_derived(name_or_path):
        return devsets.resolve(
            name_or_path, split, image_size,
            load_base=lambda name, split, root, size, download: load_dataset(name, split, root, size, download),
            info_base=lambda name, size: dataset_info(name, size))
    if spec is None:
        return _custom(name_or_path, split, image_size)
    size = image_size or spec.size
    info = DatasetInfo(name_or_path, (spec.channels, size, size), spec.num_classes, spec.multilabel)

    def build(data_root: str, download: bool) -> Dataset:
        raw = _locate(name_or_path, spec, split if split == "train" else spec.test_split, data_root, download)
        if isinstance(raw, _Arrays):
            return ImageTensorDataset(_square_resize(raw.images, size), raw.labels, info)
        return ImageFileDataset(raw, info)

    return info, build


def _locate(name: str, spec: _Spec, split: str, data_root: str, download: bool):
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
                    f"{name}: the files in {folder} could not be read ({_one_line(e)}); they may be corrupt "
                    f"or incomplete: replace them, or remove them to download again"
                ) from None
    if download:
        try:
            with _download_timeout():
                return spec.sources[0].read(data_root, split, True)
        except GlowflowError:
            raise
        except Exception as e:
            tried.append(f"download into {data_root} (failed: {_one_line(e)})")
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


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# Preprocessing


def _square_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, C, H, W), C 1 or 3 -> uint8 (N, C, size, size), each image through _square.

    Done once when an in-memory dataset is loaded (PIL's resize, not torch's bilinear kernel,
    which differs from it by one level on some pixels)."""
    from PIL import Image

    n, c, h, w = images.shape
    if (h, w) == (size, size):
        return images.contiguous()
    hwc = images.permute(0, 2, 3, 1).numpy()
    out = np.empty((n, size, size, c), dtype=np.uint8)
    for i in range(n):
        image = Image.fromarray(np.ascontiguousarray(hwc[i] if c == 3 else hwc[i, :, :, 0]))
        out[i] = np.asarray(_square(image, size)).reshape(size, size, c)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


class _Reshaped(Dataset):
    """Wraps a dataset to yield images of another (C, size, size): channels converted on the
    uint8 pixels, then resized as every dataset here is."""

    def __init__(self, base: Dataset, image_shape: Tuple[int, int, int], info: DatasetInfo):
        self.base, self.image_shape, self.info = base, image_shape, info

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        image, label = self.base[i]
        pixels = image.mul(255).round_().to(torch.uint8)
        channels, size = self.image_shape[:2]
        if pixels.shape[0] == 1 and channels == 3:
            pixels = pixels.expand(3, -1, -1)
        elif pixels.shape[0] == 3 and channels == 1:
            pixels = _luminance(pixels)
        return _square_resize(pixels.unsqueeze(0), size)[0].float().div_(255), label


def _luminance(rgb: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (1, H, W), exactly PIL's convert('L')."""
    r, g, b = rgb.to(torch.int32)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8).unsqueeze(0)


# --------------------------------------------------------------------------------------------
# The user's own data: an image folder or a .npz file


def _custom(path: str, split: str, image_size: Optional[int]):
    """(DatasetInfo, build) for the folder or .npz file at ``path``; see _resolve."""
    if not os.path.exists(path):
        if "/" in path or os.sep in path or path.endswith(".npz"):
            raise GlowflowError(f"dataset path {path} does not exist")
        raise GlowflowError(
            f"unknown dataset {path!r}: use one of {', '.join(DATASET_NAMES)}, "
            f"or the path of an image folder or a .npz file"
        )
    if os.path.isdir(path):
        return _custom_folder(path, split, image_size)
    if path.endswith(".npz"):
        return _custom_npz(path, split, image_size)
    raise GlowflowError(f"{path} is neither a folder of images nor a .npz file")


def _list_images(folder: str) -> list:
    """Image files under ``folder`` (recursively), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def _subfolder(root: str, names: Sequence[str]) -> Optional[str]:
    return next((os.path.join(root, n) for n in names if os.path.isdir(os.path.join(root, n))), None)


def _custom_folder(path: str, split: str, image_size: Optional[int]):
    """One sub-folder per class (label = its index in sorted order), or images directly in the
    folder (label 0). With train/ and test/ (or val/) sub-folders those are the two splits;
    otherwise both splits are the whole folder. Image shape: the first image's mode (grey or
    RGB) and its shorter side, unless image_size is given."""
    split_dirs = {"train": _subfolder(path, ["train"]), "test": _subfolder(path, ["test", "val"])}
    if any(split_dirs.values()):
        folder = split_dirs[split]
        if folder is None:
            raise GlowflowError(f"{path} has a {'test (or val)' if split == 'train' else 'train'} folder but no "
                                f"{'train' if split == 'train' else 'test (or val)'} folder")
        tops = [d for d in split_dirs.values() if d]
    else:
        folder, tops = path, [path]
    classes = sorted({d for top in tops for d in os.listdir(top)
                      if not d.startswith(".") and os.path.isdir(os.path.join(top, d))})
    if classes:
        samples = [(p, i) for i, c in enumerate(classes) for p in _list_images(os.path.join(folder, c))]
    else:
        samples = [(p, 0) for p in _list_images(folder)]
    if not samples:
        raise GlowflowError(
            f"no images in {folder}: expected one sub-folder per class, or image files "
            f"({' '.join(IMAGE_EXTENSIONS)}) directly in it"
        )
    first = _open_image(samples[0][0])
    channels = 1 if first.mode in ("1", "L", "LA", "I", "I;16", "F") else 3
    size = image_size or min(first.size)
    info = DatasetInfo(path, (channels, size, size), max(len(classes), 1), False)
    return info, lambda data_root, download: ImageFileDataset(_ImageList(samples), info)


def _custom_npz(path: str, split: str, image_size: Optional[int]):
    """``images`` uint8 (N, H, W) or (N, H, W, C) and optional ``labels``: (N,) integers or (N, K)
    multi-hot. Per-split ``train_images``/``test_images`` (with ``train_labels``/``test_labels``)
    are used when there is no ``images``. Read with allow_pickle=False."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            prefix = "" if "images" in keys else f"{split}_"
            if f"{prefix}images" not in keys:
                raise GlowflowError(
                    f"{path} has no 'images' array (it has: {', '.join(sorted(keys)) or 'nothing'}); expected "
                    f"'images' (N, H, W) or (N, H, W, C) uint8 and optional 'labels'"
                )
            images = npz[f"{prefix}images"]
            labels = npz[f"{prefix}labels"] if f"{prefix}labels" in keys else None
    except GlowflowError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise GlowflowError(f"cannot read {path} as a .npz file: {_one_line(e)}") from None
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
        raise GlowflowError(f"{path}: labels must be {n} integers or {n} multi-hot rows, got {labels.dtype} "
                            f"array of shape {labels.shape}")
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
        pixels = _square_resize(torch.from_numpy(np.ascontiguousarray(images)), size)
        return ImageTensorDataset(pixels, torch.from_numpy(labels).to(torch.float32 if multilabel else torch.int64), info)

    return info, build
