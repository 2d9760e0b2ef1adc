"""The datasets handed to callers, and the image handling they share.

Owns :class:`DatasetInfo`, the in-memory :class:`ImageTensorDataset` and the on-demand
:class:`ImageFileDataset`; opening image files (PIL's decompression-bomb limit enforced, its
warning included) and listing them (each real folder once, whatever its symbolic links); 16-bit
grey scaled to 8 bits (:func:`to_8bit`); the centre square crop and bilinear resize every image
goes through (:func:`square`, :func:`square_resize`); and :func:`match_shape`, which converts a
dataset to another (C, H, W).

Every dataset yields ``(image, label)``: ``image`` a float32 tensor (C, H, W) in [0, 1] equal to
torchvision's ``ToTensor`` of the preprocessed uint8 pixels, ``label`` an int64 scalar (a float32
multi-hot vector (K,) for multi-label data).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, replace
from typing import Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from glowflow.errors import GlowflowError, one_line  # noqa: F401 (one_line: importable from here too)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# PIL modes of 16-bit grey ("I": 32-bit integers, which a 16-bit PNG may also open as).
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# PIL modes read as one channel; every other mode is read as RGB.
GREY_MODES = ("1", "L", "LA", "F", *SIXTEEN_BIT_MODES)


@dataclass
class DatasetInfo:
    """What the model needs to know: image_shape is (C, H, W) after preprocessing."""

    name: str
    image_shape: Tuple[int, int, int]
    num_classes: int
    multilabel: bool = False


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

    Each image is converted to the dataset's mode ('L' or 'RGB'; 16-bit grey scaled to 8 bits
    first, :func:`to_8bit`), centre-cropped to a square, resized to (size, size) with
    torchvision's ``Resize`` and turned into a tensor (``ToTensor``).
    """

    def __init__(self, base: Dataset, info: DatasetInfo):
        self.base, self.info = base, info
        self.preprocess = _Preprocess(info.image_shape[1], "L" if info.image_shape[0] == 1 else "RGB")

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        from PIL import Image

        try:
            with _bomb_warning_as_error():
                image, label = self.base[i]
        except GlowflowError:
            raise
        # PIL's "cannot identify image file", truncated files, images over its pixel limit
        except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise GlowflowError(f"{self.info.name}: cannot read image {i}: {one_line(e)}") from None
        return self.preprocess(image), torch.tensor(label, dtype=torch.int64)


class _Preprocess:
    """PIL image -> 8 bits (:func:`to_8bit`) -> mode ('L' or 'RGB') -> centre square crop ->
    resize -> ToTensor."""

    def __init__(self, size: int, mode: str):
        self.size, self.mode = size, mode

    def __call__(self, image):
        from torchvision.transforms.functional import to_tensor

        return to_tensor(square(to_8bit(image).convert(self.mode), self.size))


def to_8bit(image):
    """A 16-bit grey PIL image (:data:`SIXTEEN_BIT_MODES`, values 0..65535; mode "I" clipped to
    that range) scaled to 8-bit grey ("L"), each value v -> round(v * 255 / 65535) (so 0 -> 0,
    65535 -> 255, and an 8-bit value stored as 16 bits, 257 * k, -> k exactly); PIL's own
    conversion would clip every value above 255 to white. Any other image is returned as it is."""
    from PIL import Image

    if image.mode not in SIXTEEN_BIT_MODES:
        return image
    values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
    return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))


# --------------------------------------------------------------------------------------------
# Image files


class ImageList(Dataset):
    """(path, label) pairs -> (PIL image, label); the minimal ImageFolder for any file list."""

    def __init__(self, samples: Sequence[Tuple[str, int]]):
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return open_image(path), label


def open_image(path: str):
    """The PIL image at ``path``, fully read; GlowflowError if it cannot be, or if it has more
    pixels than PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``: PIL warns above
    it and refuses above twice it; both are refused here, before any pixel is decoded)."""
    from PIL import Image

    try:
        with _bomb_warning_as_error(), Image.open(path) as image:
            image.load()
            return image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise GlowflowError(f"refused image {path}: {one_line(e)}") from None
    except (OSError, ValueError) as e:
        raise GlowflowError(f"cannot read image {path}: {one_line(e)}") from None


@contextlib.contextmanager
def _bomb_warning_as_error():
    """PIL's DecompressionBombWarning raised as an exception, like its DecompressionBombError."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def list_images(folder: str) -> list:
    """Image files under ``folder`` (recursively, following symbolic links), sorted. A folder
    reached through a link that loops back (to ``folder`` itself or a folder above it, see
    :func:`loops_back`) or to a folder already listed is skipped, so each real folder's files are
    listed once and a link loop ends."""
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen or loops_back(dirpath, folder):
            dirnames[:] = []  # do not descend: what is below was or will be listed from elsewhere
            continue
        seen.add(real)
        dirnames.sort()
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def loops_back(path: str, root: str) -> bool:
    """True if the folder ``path`` is really ``root`` or a folder containing it (a symbolic link
    loop when ``path`` lies under ``root``), ``path`` itself not being ``root``."""
    real, root_real = os.path.realpath(path), os.path.realpath(root)
    if os.path.normpath(path) == os.path.normpath(root):
        return False
    return real == root_real or root_real.startswith(real.rstrip(os.sep) + os.sep)


# --------------------------------------------------------------------------------------------
# Square crop and resize


def square(image, size: int):
    """PIL image -> its centre square (torchvision's CenterCrop to the shorter side) -> bilinear
    resize to (size, size): what torchvision's Resize does to a PIL image."""
    from PIL import Image
    from torchvision.transforms.functional import center_crop

    side = min(image.size)
    if image.size != (side, side):
        image = center_crop(image, [side, side])
    return image if side == size else image.resize((size, size), Image.BILINEAR)


def square_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, C, H, W), C 1 or 3 -> uint8 (N, C, size, size), each image through :func:`square`.

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
        out[i] = np.asarray(square(image, size)).reshape(size, size, c)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------------------------
# Converting a dataset to another shape


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
    print(
        f"note: {name} images are {'x'.join(map(str, source))}, the in-distribution images "
        f"{'x'.join(map(str, target))}: {name} converted ({', '.join(how)})"
    )
    new_info = replace(info, image_shape=target) if info is not None else DatasetInfo(name, target, 1)
    return _Reshaped(dataset, target, new_info)


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
        return square_resize(pixels.unsqueeze(0), size)[0].float().div_(255), label


def _luminance(rgb: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (1, H, W), exactly PIL's convert('L')."""
    r, g, b = rgb.to(torch.int32)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8).unsqueeze(0)
