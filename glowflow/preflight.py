"""The command line's names and paths checked before torch loads: a typo in a dataset name or a
checkpoint path is a one-line :class:`GlowflowError` within a moment, naming the nearest known
name or existing path (``did you mean ...?``), not after seconds of importing PyTorch.

Only what needs no torch is checked here: that a dataset is a known name (:mod:`glowflow.names`),
a development set built on one, or an existing path; that a checkpoint is an existing file or
folder, or a ``pretrained:NAME`` that ships. Whether the file is a readable checkpoint, or the
folder a readable dataset, is for the modules that read them.
"""

from __future__ import annotations

import difflib
import os
from typing import Iterable, List, Optional

from glowflow import __version__
from glowflow.errors import GlowflowError
from glowflow.names import (
    DATASET_NAMES,
    DERIVED_SYNTAX,
    PRETRAINED_PREFIX,
    SHIPPED,
    SYNTHETIC,
    parse_derived,
    shipped_name,
)

MAX_SUGGESTIONS = 3


def did_you_mean(word: str, candidates: Iterable[str], cutoff: float = 0.6) -> str:
    """`` (did you mean X?)``, or ``X or Y``, for the candidates nearest to ``word`` (difflib's
    ratio at least ``cutoff``, letter case ignored); '' when none is near."""
    by_folded = {}
    for candidate in candidates:
        by_folded.setdefault(candidate.lower(), candidate)
    if word.lower() in by_folded:  # the same name in other letter case: that one only
        return f" (did you mean {by_folded[word.lower()]}?)"
    near = difflib.get_close_matches(word.lower(), list(by_folded), n=MAX_SUGGESTIONS, cutoff=cutoff)
    return f" (did you mean {' or '.join(by_folded[n] for n in near)}?)" if near else ""


def nearest_paths(path: str) -> List[str]:
    """Existing paths near a missing ``path``: at its first missing part, the entries of the folder
    above whose names are near that part and with which the rest of ``path`` exists."""
    parts = os.path.normpath(path).split(os.sep)
    start = 1 if os.path.isabs(path) else 0
    folder = os.sep if start else os.curdir
    for i in range(start, len(parts)):
        here = os.path.join(folder, parts[i]) if folder != os.curdir else parts[i]
        if os.path.exists(here):
            folder = here
            continue
        try:
            entries = os.listdir(folder)
        except OSError:
            return []
        near = difflib.get_close_matches(parts[i], entries, n=MAX_SUGGESTIONS, cutoff=0.6)
        rest = parts[i + 1 :]
        found = []
        for name in near:
            candidate = os.path.join(folder, name, *rest) if folder != os.curdir else os.path.join(name, *rest)
            if os.path.exists(candidate):
                found.append(candidate)
        return found
    return []


def _path_hint(path: str) -> str:
    found = nearest_paths(path)
    return f" (did you mean {' or '.join(found)}?)" if found else ""


def _looks_like_path(name: str) -> bool:
    return "/" in name or os.sep in name or name.endswith(".npz")


def check_dataset(name: str, flag: str) -> None:
    """GlowflowError unless ``name`` (given to ``flag``) is a known dataset name, a development set
    of one (``NAME:classes=...``, ``vflip:NAME``, ``hflip:NAME``), a synthetic set or an existing path."""
    if name in DATASET_NAMES or name in SYNTHETIC or os.path.exists(name):
        return
    derived = parse_derived(name)
    if derived is not None:
        try:
            check_dataset(derived.base, flag)
        except GlowflowError as err:
            raise GlowflowError(f"{err} (in {flag} {name})") from None
        return
    if _looks_like_path(name):
        raise GlowflowError(f"{flag}: dataset path {name} does not exist{_path_hint(name)}")
    raise GlowflowError(
        f"{flag}: unknown dataset {name!r}{did_you_mean(name, DATASET_NAMES + SYNTHETIC)}: use one of "
        f"{', '.join(DATASET_NAMES)}, a development set ({', '.join(SYNTHETIC)}, {', '.join(DERIVED_SYNTAX)}), "
        f"or the path of an image folder or a .npz file"
    )


def check_checkpoint(path: str, flag: str) -> None:
    """GlowflowError unless ``path`` (given to ``flag``) is an existing file or folder, or
    ``pretrained:NAME`` for a model that ships with glowflow."""
    name = shipped_name(path)
    if name is not None:
        if name not in SHIPPED:
            raise GlowflowError(
                f"{flag}: no pretrained model named {name!r:.60} ships with this version of glowflow "
                f"({__version__}){did_you_mean(name, SHIPPED)}; available: {', '.join(sorted(SHIPPED)) or 'none'}"
            )
        return
    if os.path.exists(path):
        return
    if path in SHIPPED:
        hint = f" (did you mean {PRETRAINED_PREFIX}{path}, the model shipped with glowflow?)"
    else:
        hint = _path_hint(path) or did_you_mean(path, [PRETRAINED_PREFIX + n for n in SHIPPED])
    raise GlowflowError(f"{flag}: checkpoint not found: {path}{hint}")


def check_command_line(
    dataset: Optional[str],
    out_datasets: Iterable[str],
    checkpoints: Iterable[tuple],
) -> None:
    """Every check above: ``dataset`` (``--dataset``, None when not given), the ``--out_dataset``
    names that the command will read, and ``(flag, path)`` of each checkpoint given."""
    if dataset is not None:
        check_dataset(dataset, "--dataset")
    for name in out_datasets:
        check_dataset(name, "--out_dataset")
    for flag, path in checkpoints:
        if path is not None:
            check_checkpoint(path, flag)
