"""The names a user can type that glowflow knows without loading torch: the 13 named datasets, the
development sets' names and their syntax, and the pretrained models shipped in the package.

The modules that own what the names stand for import them from here (:mod:`glowflow.data.specs`
the dataset names, :mod:`glowflow.data.devsets` the development sets, :mod:`glowflow.pretrained`
the shipped models), so that the command line can check a name before torch loads
(:mod:`glowflow.preflight`). This module imports nothing but the standard library.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

DATASET_NAMES = (
    "mnist",
    "fashionmnist",
    "cifar10",
    "cifar100",
    "svhn",
    "chestmnist",
    "octmnist",
    "tissuemnist",
    "pneumoniamnist",
    "tinyimagenet",
    "places365",
    "dtd",
    "imagenet",
)
"""The 13 named datasets (:data:`glowflow.data.specs.SPECS` describes each)."""

SYNTHETIC = ("digits", "mnist5k", "noise", "constant")
"""The synthetic development sets (:mod:`glowflow.data.devsets` generates them)."""

DERIVED_SYNTAX = ("NAME:classes=A,B,...", "vflip:NAME", "hflip:NAME")
"""How a development set derived from another dataset is written."""

_CLASSES = re.compile(r"^(?P<base>.+):classes=(?P<classes>\d+(,\d+)*)$")
_FLIP = re.compile(r"^(?P<how>vflip|hflip):(?P<base>.+)$")


def is_derived(name: str) -> bool:
    """True for a synthetic set's name and for ``NAME:classes=...``, ``vflip:NAME``, ``hflip:NAME``."""
    name = str(name)
    return name in SYNTHETIC or bool(_CLASSES.match(name) or _FLIP.match(name))


@dataclass(frozen=True)
class DerivedName:
    """A name of a set derived from the dataset named ``base``: a class subset or a flip."""

    name: str  # the whole name, e.g. "fashionmnist:classes=8,9" or "vflip:mnist"
    base: str  # the name of the dataset it is derived from
    classes: Tuple[int, ...] = ()  # a class subset: the labels kept, sorted; () for a flip
    flip_dim: Optional[int] = None  # a flip: -2 (vflip, upside down) or -1 (hflip, left to right)


def parse_derived(name: str) -> Optional[DerivedName]:
    """``NAME:classes=A,B,...``, ``vflip:NAME`` or ``hflip:NAME`` taken apart; None for any other
    name (synthetic sets included). A class subset is matched first: ``vflip:x:classes=1`` is a
    subset of ``vflip:x``."""
    match = _CLASSES.match(name)
    if match:
        classes = tuple(sorted({int(c) for c in match["classes"].split(",")}))
        return DerivedName(name, match["base"], classes=classes)
    match = _FLIP.match(name)
    if match:
        return DerivedName(name, match["base"], flip_dim=-2 if match["how"] == "vflip" else -1)
    return None


PRETRAINED_PREFIX = "pretrained:"
"""``--checkpoint pretrained:NAME`` names a model folder shipped in the package (:data:`SHIPPED`)."""
SHIPPED: Dict[str, str] = {"fashionmnist": "pretrained_models/fashionmnist"}
"""``pretrained:NAME`` -> the model folder shipped in the package (relative to glowflow/; package
data in pyproject.toml, so that a non-editable install has it; scripts/make_pretrained.py writes
it): ``fashionmnist``, the default architecture trained on Fashion-MNIST (1x32x32, 8 bits), whose
card (README.md in the folder) gives the training command and the bits/dim."""


def shipped_name(checkpoint: Optional[str]) -> Optional[str]:
    """``NAME`` of a ``pretrained:NAME`` checkpoint path; None for any other path (or None)."""
    if isinstance(checkpoint, str) and checkpoint.startswith(PRETRAINED_PREFIX):
        return checkpoint[len(PRETRAINED_PREFIX) :]
    return None
