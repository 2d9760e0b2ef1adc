"""Where a run writes: the root of the default output folders and the file-name-safe short name
of a dataset (:func:`dataset_slug`) that names them."""

import hashlib
import os
import re

OUTPUT_ROOT = "outputs"
"""Where the default output folders (``outputs/Glow_<dataset>``) are made."""
SLUG_LENGTH = 80
"""Longest :func:`dataset_slug`, so that every file name built from it fits in 255 bytes."""


def dataset_slug(dataset: str) -> str:
    """A file-name-safe short name of a dataset name or path: 'fashionmnist:classes=0,1' ->
    'fashionmnist_classes_0_1', '/data/my_set.npz' -> 'my_set'. At most SLUG_LENGTH characters: a
    longer one keeps its start and ends with '_' and 8 hex digits of a hash of the whole name."""
    name = str(dataset)
    if os.sep in name or name.endswith(".npz"):
        name = os.path.splitext(os.path.basename(os.path.normpath(name)))[0] or "custom"
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "custom"
    if len(slug) <= SLUG_LENGTH:
        return slug
    digest = hashlib.sha1(str(dataset).encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"{slug[: SLUG_LENGTH - 9]}_{digest}"
