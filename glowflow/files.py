"""Writing files so that nothing half-written is ever left under a final name.

:func:`atomic_write` writes through a temporary file in the target's folder (named
``.tmp-<name>-<random>``), flushes and fsyncs it, then renames it over the target: a crash, a
kill or a full disk leaves either the old file or the new one, never a truncated one, and the
temporary file is removed on any failure. An ``OSError`` (no space left, read-only folder, a name
too long) becomes a one-line :class:`GlowflowError` naming the file.

:func:`check_writable_folder` proves, before a command does any work, that its output folder can
be written, without creating it (so a command refused later leaves no empty folder behind).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import BinaryIO, Callable, Iterator

from glowflow.errors import GlowflowError

TEMP_PREFIX = ".tmp-"


def describe_os_error(err: OSError) -> str:
    """``err`` in a few words: its strerror (e.g. 'No space left on device'), or its text."""
    return err.strerror or str(err) or type(err).__name__


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[BinaryIO]:
    """A binary file handle whose content appears at ``path`` only when the block ends without an
    exception (temporary file, fsync, rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{name[:64]}-", dir=folder)
    except OSError as err:
        raise GlowflowError(f"cannot write {path}: {describe_os_error(err)}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _created_file_mode())  # mkstemp's 0600, widened to what open() would give
        os.replace(tmp, path)
    except OSError as err:
        _remove_quietly(tmp)
        raise GlowflowError(f"cannot write {path}: {describe_os_error(err)}") from None
    except BaseException:
        _remove_quietly(tmp)
        raise


def _created_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0666 less the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str, write: Callable[[BinaryIO], object]) -> str:
    """Call ``write(handle)`` on a temporary binary file and rename it to ``path``. Returns ``path``."""
    with atomic_output(path) as handle:
        write(handle)
    return path


def atomic_write_text(path: str, text: str) -> str:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def check_writable_folder(folder: str) -> None:
    """GlowflowError unless files can be written in ``folder``: it is (or its nearest existing
    ancestor, where it will be made, is) a folder in which a probe file can be created. Creates
    nothing that stays."""
    existing = os.path.abspath(folder)
    while not os.path.lexists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise GlowflowError(f"cannot write to output directory {folder}: {existing} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}write-test-", dir=existing)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise GlowflowError(f"cannot write to output directory {folder}: {describe_os_error(err)}") from None


def remove_temporary_files(folder: str) -> list:
    """Remove the temporary files an interrupted :func:`atomic_write` left in ``folder``; returns
    their paths. Call it only while no other process writes there (the training lock)."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if name.startswith(TEMP_PREFIX):
            path = os.path.join(folder, name)
            if os.path.isfile(path) and _remove_quietly(path):
                removed.append(path)
    return removed


def _remove_quietly(path: str) -> bool:
    try:
        os.remove(path)
        return True
    except OSError:
        return False
