""".npz files read without trusting them: the one reader of every .npz glowflow is handed (your
own images, a saved outlier detector or reference).

Before any array is read: the path must be a regular file (a FIFO, a device or a socket would
block or never end), every member's shape and type are taken from its .npy header (a few bytes
decompressed), an array of Python objects is refused (that is pickle), the declared sizes must fit
the caller's cap and the machine's memory, and a member that would decompress to far more than it
takes in the zip (a zip bomb) is refused. Arrays are then read with ``allow_pickle=False``.
"""

from __future__ import annotations

import contextlib
import math
import os
import stat
import zipfile
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

import numpy as np

from glowflow.errors import GlowflowError

MAX_EXPANSION = 200
"""Largest ratio of a member's declared (uncompressed) size to its compressed size, for members
over :data:`EXPANSION_CHECKED_BYTES`: real images compress far less (an all-black set of a few
hundred kilobytes may compress more, and is small enough not to matter)."""
EXPANSION_CHECKED_BYTES = 64 * 2**20
"""Members declaring fewer bytes than this are never refused for their compression ratio."""


@dataclass(frozen=True)
class Member:
    """One array of a .npz as its .npy header declares it: shape, dtype, bytes, compressed bytes."""

    shape: Tuple[int, ...]
    dtype: np.dtype
    nbytes: int
    compressed: int


def size_text(n: float) -> str:
    """``n`` bytes in words: '2.8 MB', '98.0 GiB'."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def check_regular_file(path: str, what: str) -> None:
    """GlowflowError unless ``path`` (links followed) is a regular file: missing, a folder, a FIFO,
    a device or a socket is refused before it is opened. ``what`` names the file in the message."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise GlowflowError(f"no {what} at {path}") from None
    except OSError as err:
        raise GlowflowError(f"cannot read {what} {path}: {err.strerror or err}") from None
    if stat.S_ISDIR(mode):
        raise GlowflowError(f"{path} is a folder, not a {what} file")
    if not stat.S_ISREG(mode):
        raise GlowflowError(f"{path} is not a regular file (a FIFO, device or socket): {what} files only")


def physical_memory() -> Optional[int]:
    """Bytes of memory of this machine, or None where it cannot be told."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def _read_header(handle) -> Optional[Tuple[Tuple[int, ...], np.dtype]]:
    """(shape, dtype) from an open .npy stream's header, or None when it is not a .npy stream."""
    from numpy.lib import format as npy

    if handle.read(6) != npy.MAGIC_PREFIX:
        return None
    major, minor = handle.read(2)
    if (major, minor) == (1, 0):
        shape, _, dtype = npy.read_array_header_1_0(handle)
    elif (major, minor) == (2, 0):
        shape, _, dtype = npy.read_array_header_2_0(handle)
    else:
        raise ValueError(f".npy format version {major}.{minor} is not supported")
    return tuple(int(s) for s in shape), np.dtype(dtype)


def members(path: str, what: str) -> Dict[str, Member]:
    """Every member of the .npz at ``path`` as its header declares it (name without '.npy'),
    reading nothing else. A member that is not a .npy array declares its zip size."""
    found: Dict[str, Member] = {}
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            with archive.open(info) as handle:
                header = _read_header(handle)
            if header is None:
                found[name] = Member((info.file_size,), np.dtype(np.uint8), info.file_size, info.compress_size)
                continue
            shape, dtype = header
            if dtype.hasobject:
                raise GlowflowError(
                    f"{what} {path}: its array {name!r} holds Python objects (a pickle), which glowflow never reads"
                )
            if any(s < 0 for s in shape):
                raise GlowflowError(f"{what} {path}: its array {name!r} declares the shape {shape}")
            nbytes = math.prod(shape) * dtype.itemsize
            found[name] = Member(shape, dtype, nbytes, info.compress_size)
    return found


def _check_sizes(path: str, what: str, found: Dict[str, Member], max_bytes: Optional[int]) -> None:
    """Refuse declared sizes over ``max_bytes`` (all members together) or the machine's memory,
    and members that would expand more than :data:`MAX_EXPANSION` times."""
    total = sum(m.nbytes for m in found.values())
    memory = physical_memory()
    for cap, where in ((max_bytes, "the most glowflow reads from such a file"), (memory, "this machine's memory")):
        if cap is not None and total > cap:
            biggest = max(found, key=lambda n: found[n].nbytes)
            shape = found[biggest].shape
            raise GlowflowError(
                f"refused {what} {path}: its arrays declare {size_text(total)} (the largest, {biggest!r}, "
                f"shape {shape}), more than {where} ({size_text(cap)}); nothing was read"
            )
    for name, m in found.items():
        if m.nbytes > EXPANSION_CHECKED_BYTES and m.nbytes > MAX_EXPANSION * max(m.compressed, 1):
            raise GlowflowError(
                f"refused {what} {path}: its array {name!r} would decompress from {size_text(m.compressed)} "
                f"to {size_text(m.nbytes)} (over {MAX_EXPANSION} times: a zip bomb?); nothing was read"
            )


@contextlib.contextmanager
def open_npz(path: str, what: str, max_bytes: Optional[int] = None) -> Iterator[Tuple[object, Dict[str, Member]]]:
    """``(npz, members)``: the open ``np.load(path, allow_pickle=False)`` and every member's
    declared :class:`Member`, once the file has passed the checks of this module. Read an array
    (``npz[name]``) only after checking its declared shape and dtype against what it should be.
    Damaged files and a MemoryError while reading become one-line GlowflowErrors naming ``what``."""
    check_regular_file(path, what)
    try:
        found = members(path, what)
        _check_sizes(path, what, found, max_bytes)
        with np.load(path, allow_pickle=False) as npz:
            yield npz, found
    except GlowflowError:
        raise
    except MemoryError:
        raise GlowflowError(f"cannot read {what} {path}: not enough memory for its arrays") from None
    except (OSError, ValueError, EOFError, KeyError, NotImplementedError, zipfile.BadZipFile, RuntimeError) as err:
        text = " ".join(str(err).split())[:300] or type(err).__name__
        raise GlowflowError(f"cannot read {what} {path}: {text}") from None
