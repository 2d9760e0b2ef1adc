"""A command that fails leaves no empty output folder behind: :func:`no_empty_folder_left`.

A command may make its output folder (and the folders above it) before it knows that it can do its
work; when it then fails before writing anything there, the empty folders it made are removed
again, so that a failed command leaves the disk as it found it. Only folders that did not exist
before the command and are empty are removed (``os.rmdir`` removes nothing else), never a file.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, List, Optional, Set


def _missing(folder: str) -> List[str]:
    """``folder`` and the folders above it that do not exist yet, deepest first."""
    missing = []
    path = os.path.abspath(folder)
    while not os.path.lexists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def _subfolders(folder: str) -> Set[str]:
    try:
        with os.scandir(folder) as entries:
            return {e.path for e in entries if e.is_dir(follow_symlinks=False)}
    except OSError:
        return set()


@contextlib.contextmanager
def no_empty_folder_left(folder: Optional[str]) -> Iterator[None]:
    """Run the block; when it raises (a GlowflowError, a Ctrl-C, anything), remove the folders it
    made that are still empty: ``folder`` and those above it, if they did not exist before, and
    the folders it made directly inside ``folder`` (e.g. ``outputs/Glow_<dataset>`` for
    ``folder="outputs"``). ``folder=None``: nothing is watched."""
    if folder is None:
        yield
        return
    missing = _missing(folder)
    before = set() if missing else _subfolders(os.path.abspath(folder))
    try:
        yield
    except BaseException:
        made = sorted(_subfolders(os.path.abspath(folder)) - before)
        for path in made + missing:  # deepest first
            with contextlib.suppress(OSError):  # not empty (or gone): left as it is
                os.rmdir(path)
        raise
