"""The images ``glowflow --score`` reads: image files, folders and .npz files, however few images
they hold (scoring needs no test split), as one dataset of the model's shape with a name per image.

A folder with train/ and test/ (or val/) sub-folders gives its test split, any other folder every
image in it; a .npz its ``test_images`` when it has per-split arrays, else its ``images``. An image
file that cannot be read (damaged, not an image, not a regular file: a FIFO would block) does not
stop the others: it is read as a black placeholder, recorded in :attr:`ScoredImages.unreadable`,
and left out of the scores; only a set with no readable image at all is an error.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

from torch.utils.data import Dataset

from glowflow import data
from glowflow.config import dataset_slug
from glowflow.data import custom
from glowflow.data.datasets import GREY_MODES, DatasetInfo, ImageFileDataset, one_line, open_image
from glowflow.data.npzfile import check_regular_file, members
from glowflow.errors import GlowflowError


class _ImageFiles(Dataset):
    """Image files read on demand as ``(PIL image, 0)``; a file that cannot be read gives a 1x1
    black placeholder and its reason is kept in ``unreadable`` ({index: reason}). Read it in the
    main process (a DataLoader without workers), which is how the detector reads."""

    def __init__(self, paths: Sequence[str]):
        self.samples = [(str(p), 0) for p in paths]
        self.unreadable: Dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image

        path = self.samples[i][0]
        try:
            check_regular_file(path, "image")
            return open_image(path), 0
        except GlowflowError as err:
            self.unreadable[i] = one_line(err)
            return Image.new("L", (1, 1)), 0

    def first_mode(self) -> Optional[str]:
        """The PIL mode of the first readable image (None when none is)."""
        for i in range(len(self)):
            image, _ = self[i]
            if i not in self.unreadable:
                return image.mode
        return None


class ScoredImages(Dataset):
    """The images to score, of the model's shape, yielding ``(image, label)``: ``names`` (one per
    image: its file's path, or ``<file.npz>#<index>``; the bare index for a single .npz),
    ``unreadable`` ({index: reason} of the image files that could not be read, complete once every
    image has been read), ``name`` (what was given, for messages) and ``slug`` (for file names)."""

    def __init__(self, parts: List[Tuple[Dataset, List[str], Optional[_ImageFiles]]], name: str, slug: str, shape):
        self.parts, self.name, self.slug = parts, name, slug
        self.names = [n for _, names, _ in parts for n in names]
        self.info = DatasetInfo(name, tuple(shape), 1)
        self._starts, total = [], 0
        for dataset, _, _ in parts:
            self._starts.append(total)
            total += len(dataset)
        self._length = total

    def __len__(self) -> int:
        return self._length

    def _locate(self, i: int) -> Tuple[int, int]:
        i = int(i)
        if i < 0:
            i += self._length
        for k in range(len(self.parts) - 1, -1, -1):
            if i >= self._starts[k]:
                return k, i - self._starts[k]
        raise IndexError(i)

    def __getitem__(self, i):
        k, j = self._locate(i)
        return self.parts[k][0][j]

    def __getitems__(self, indices):
        if len(self.parts) == 1 and hasattr(self.parts[0][0], "__getitems__"):
            return self.parts[0][0].__getitems__(indices)
        return [self[i] for i in indices]

    @property
    def unreadable(self) -> Dict[int, str]:
        found = {}
        for start, (_, _, files) in zip(self._starts, self.parts):
            if files is not None:
                found.update({start + i: reason for i, reason in files.unreadable.items()})
        return dict(sorted(found.items()))


def _slug(paths: Sequence[str]) -> str:
    """File-name slug of what is scored: a folder's or .npz's name, an image file's name without
    its extension; ``<first>_and_<n>_more`` for several paths."""
    first = paths[0]
    if os.path.isdir(first) or first.endswith(".npz"):
        slug = dataset_slug(first if os.sep in first or first.endswith(".npz") else os.path.abspath(first))
    else:
        slug = dataset_slug(os.path.splitext(os.path.basename(first))[0] or "image")
    return slug if len(paths) == 1 else f"{slug}_and_{len(paths) - 1}_more"


def _check_path(path: str) -> None:
    if not os.path.exists(path):
        raise GlowflowError(f"--score: {path} does not exist")
    if not os.access(path, os.R_OK) or (os.path.isdir(path) and not os.access(path, os.X_OK)):
        raise GlowflowError(f"--score: cannot read {path} (permission denied)")


def _file_part(paths: List[str], shape, single: bool) -> Tuple[Dataset, List[str], _ImageFiles]:
    """Image files as a dataset of ``shape``: converted as :func:`glowflow.data.match_shape`
    converts (each image first to the first readable image's mode, as a folder's)."""
    files = _ImageFiles(paths)
    mode = files.first_mode()
    channels = shape[0] if mode is None else (1 if mode in GREY_MODES else 3)
    info = DatasetInfo(paths[0] if single else "images", (channels, shape[1], shape[2]), 1)
    dataset = ImageFileDataset(files, info)
    return data.match_shape(dataset, shape), list(paths), files


def _npz_part(path: str, shape, single: bool) -> Tuple[Dataset, List[str], None]:
    """A .npz's images (its test split when it has per-split arrays) at ``shape``."""
    check_regular_file(path, ".npz")
    try:
        split = "all" if "images" in members(path, ".npz file") else "test"
    except GlowflowError:
        raise
    except Exception:  # a damaged file: the reader says what is wrong with it
        split = "all"
    info, build = custom.custom_dataset(path, split, shape[1])
    dataset = build("", False)
    if len(dataset) == 0:
        raise GlowflowError(f"--score: {path} holds no images")
    dataset = data.match_shape(dataset, shape) if tuple(info.image_shape) != tuple(shape) else dataset
    names = [str(i) if single else f"{path}#{i}" for i in range(len(dataset))]
    return dataset, names, None


def load_images_to_score(paths: Sequence[str], image_shape: Sequence[int]) -> ScoredImages:
    """Every image at ``paths`` (image files, folders of images, .npz files) as one
    :class:`ScoredImages` of ``image_shape``. One-line GlowflowError for a path that does not
    exist or cannot be read, a folder without images, a damaged .npz, and when no image at all
    can be read."""
    paths = [str(p) for p in ([paths] if isinstance(paths, str) else paths)]
    if not paths:
        raise GlowflowError("--score needs at least one image file, folder or .npz file")
    shape = tuple(int(s) for s in image_shape)
    single = len(paths) == 1
    parts, pending = [], []
    for path in paths:
        _check_path(path)
        if os.path.isdir(path) or path.endswith(".npz"):
            if pending:
                parts.append(_file_part(pending, shape, False))
                pending = []
            if os.path.isdir(path):
                split = "test" if custom.has_split_folders(path) else "all"
                _, _, samples = custom.folder_samples(path, split)
                parts.append(_file_part([p for p, _ in samples], shape, single))
            else:
                parts.append(_npz_part(path, shape, single))
        else:
            pending.append(path)
    if pending:
        parts.append(_file_part(pending, shape, single))
    name = paths[0] if single else f"{paths[0]} and {len(paths) - 1} more"
    images = ScoredImages(parts, name, _slug(paths), shape)
    check_some_readable(images)
    return images


def check_some_readable(images: ScoredImages) -> None:
    """GlowflowError when every image of ``images`` found so far is unreadable (the first reason
    given)."""
    unreadable = images.unreadable
    if len(images) and len(unreadable) == len(images):
        first = next(iter(unreadable.values()))
        if len(images) == 1 and not os.path.isdir(images.name):
            raise GlowflowError(f"--score: {first}")
        raise GlowflowError(f"--score: no readable image in {images.name} ({len(images)} tried; the first: {first})")


def unreadable_note(images: ScoredImages, limit: int = 3) -> Optional[str]:
    """One line naming the image files skipped as unreadable (None when there are none)."""
    unreadable = images.unreadable
    if not unreadable:
        return None
    shown = "; ".join(list(unreadable.values())[:limit])
    more = f"; and {len(unreadable) - limit} more" if len(unreadable) > limit else ""
    return f"note: skipped {len(unreadable)} unreadable image file(s), listed in the CSV: {shown}{more}"
