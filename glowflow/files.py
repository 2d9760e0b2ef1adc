"""Writing files so that nothing half-written is ever left under a final name.

:func:`atomic_write` writes through a temporary file in the target's folder, flushes and fsyncs
it, then renames it over the target: a crash, a kill or a full disk leaves either the old file or
the new one, never a truncated one, and the temporary file is removed on any failure. An
``OSError`` (no space left, read-only folder, a name too long), or torch's ``RuntimeError`` around
one (``torch.save`` reports a failed write as "... file write failed" / "unexpected pos"), becomes
a one-line :class:`GlowflowError` naming the file.

Temporary files are named ``.tmp-<name>-<random>~<pid>@<host>``: the process writing them and its
machine. A process killed outright (``kill -9``, a power cut) cannot remove its own; they are
*stale* once that process is gone, and :func:`remove_stale_temporaries` removes them, which every
write does once per folder and process (and reading a model folder, glowflow/pretrained.py). A
temporary file of a process still running is never removed; one of another machine (a shared
filesystem) or one without an owner in its name (older glowflow) only when it is a day old.

:func:`folder_update` writes several files of one folder as a whole: when a write fails, the
files it replaced are put back and what it created (files, folders) removed.

:func:`check_writable_folder` proves, before a command does any work, that its output folder can
be written, without creating it (so a command refused later leaves no empty folder behind).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
import time
from typing import BinaryIO, Callable, Iterator, List, Optional, Sequence

from glowflow.errors import GlowflowError

TEMP_PREFIX = ".tmp-"
STALE_AGE_S = 24 * 3600
"""Age (since last written) after which a temporary file whose writer cannot be asked (another
machine's, or an older glowflow's without an owner in its name) counts as stale."""
_OWNER = re.compile(r"~(\d{1,10})@([A-Za-z0-9._-]{1,64})$")
_TORCH_WRITE_FAILED = re.compile(r"file write failed|PytorchStreamWriter failed|unexpected pos \d+")
_swept: set = set()  # folders this process has already swept of stale temporaries


def describe_os_error(err: OSError) -> str:
    """``err`` in a few words: its strerror (e.g. 'No space left on device'), or its text."""
    return err.strerror or str(err) or type(err).__name__


def write_failure(err: BaseException) -> Optional[str]:
    """Why a write failed, in a few words, when ``err`` is a failed write: an ``OSError``, or the
    ``RuntimeError`` torch raises around one (its chained ``OSError``, or its message); else None."""
    seen = err
    for _ in range(8):  # the exception and what it was raised from / during
        if isinstance(seen, OSError):
            return describe_os_error(seen)
        seen = seen.__cause__ or seen.__context__
        if seen is None:
            break
    if isinstance(err, RuntimeError) and _TORCH_WRITE_FAILED.search(str(err)):
        return "the write failed (is the disk full?)"
    return None


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:64] or "unknown"


def temporary_name(name: str) -> str:
    """A fresh temporary file name for ``name`` that says which process on which machine wrote it."""
    return f"{TEMP_PREFIX}{name[:64]}-{secrets.token_hex(4)}~{os.getpid()}@{_host()}"


def _owner_suffix() -> str:
    return f"~{os.getpid()}@{_host()}"


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[BinaryIO]:
    """A binary file handle whose content appears at ``path`` only when the block ends without an
    exception (temporary file, fsync, rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    try:
        os.makedirs(folder, exist_ok=True)
        _sweep_once(folder)
        fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{name[:64]}-", suffix=_owner_suffix(), dir=folder)
    except OSError as err:
        raise GlowflowError(f"cannot write {path}: {describe_os_error(err)}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _created_file_mode())  # mkstemp's 0600, widened to what open() would give
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        _remove_quietly(tmp)
        reason = write_failure(err)
        if reason is None:
            raise
        raise GlowflowError(f"cannot write {path}: {reason}") from None
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


@contextlib.contextmanager
def folder_update(folder: str, names: Sequence[str]) -> Iterator[None]:
    """Write the files ``names`` of ``folder`` (each through :func:`atomic_write`, inside the block)
    as one: when the block fails, each of them that existed is put back as it was (from a hard link,
    or a copy, made first), each it created is removed, and so are the folders it made (``folder``
    and missing parents, when empty). Other files of ``folder`` are never touched."""
    folder = os.path.abspath(folder)
    made = []  # folders that do not exist yet, deepest first
    missing = folder
    while not os.path.lexists(missing) and os.path.dirname(missing) != missing:
        made.append(missing)
        missing = os.path.dirname(missing)
    backups = {}
    existed = set()
    try:
        for name in names:
            path = os.path.join(folder, name)
            if os.path.lexists(path):
                existed.add(name)
                backups[name] = _backup(path)
    except OSError as err:
        _remove_all(backups.values())
        raise GlowflowError(f"cannot write {folder}: {describe_os_error(err)}") from None
    try:
        yield
    except BaseException:
        for name in names:
            path = os.path.join(folder, name)
            if name in backups:
                _restore(backups[name], path)
            elif name not in existed:
                _remove_quietly(path)
        for path in made:
            with contextlib.suppress(OSError):
                os.rmdir(path)  # only when empty: never another process's files
        raise
    _remove_all(backups.values())


def _restore(backup: str, path: str) -> None:
    """Put ``backup`` back at ``path`` (a rename; when both are links to one file, which rename
    leaves as they are, the backup is only removed)."""
    try:
        if os.path.lexists(path) and os.path.samefile(backup, path):
            os.remove(backup)
        else:
            os.replace(backup, path)
    except OSError:
        pass


def _backup(path: str) -> str:
    """A second name for ``path``'s current content (a hard link, else a copy), a temporary file beside it."""
    backup = os.path.join(os.path.dirname(path), temporary_name(os.path.basename(path)))
    try:
        os.link(path, backup)
    except OSError:
        shutil.copy2(path, backup)
    return backup


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
        fd, probe = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}write-test-", suffix=_owner_suffix(), dir=existing)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise GlowflowError(f"cannot write to output directory {folder}: {describe_os_error(err)}") from None


# ----------------------------------------------------------------------------- stale temporaries


def is_stale(path: str) -> bool:
    """Whether the temporary file ``path`` was left by a writer that is gone: its process (named in
    the file name) has ended on this machine; or, for a file of another machine or without an
    owner in its name, it has not been written for :data:`STALE_AGE_S`. This process's own
    temporary files, and a running process's, are never stale."""
    name = os.path.basename(path)
    owner = _OWNER.search(name)
    if owner is not None and owner.group(2) == _host():
        pid = int(owner.group(1))
        return pid != os.getpid() and not _process_alive(pid)
    try:
        return time.time() - os.lstat(path).st_mtime > STALE_AGE_S
    except OSError:
        return False


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine exists (a process that cannot be asked counts as alive)."""
    if pid <= 0 or os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's process, alive
        return True
    return True


def _temporaries(folder: str) -> List[str]:
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    paths = (os.path.join(folder, name) for name in names if name.startswith(TEMP_PREFIX))
    return [path for path in paths if os.path.isfile(path) and not os.path.islink(path)]


def remove_stale_temporaries(folder: str) -> List[str]:
    """Remove the stale temporary files (:func:`is_stale`) that interrupted writes left in
    ``folder``; returns their paths. Safe while other processes write there."""
    return [path for path in _temporaries(folder) if is_stale(path) and _remove_quietly(path)]


def _sweep_once(folder: str) -> None:
    """:func:`remove_stale_temporaries` of ``folder``, the first time this process writes there, and
    a line on stderr when it removed any."""
    if folder in _swept:
        return
    _swept.add(folder)
    removed = remove_stale_temporaries(folder)
    if removed:
        note_removed(removed, folder)


def note_removed(removed: Sequence[str], folder: str) -> None:
    """The line saying that ``removed`` (temporary files of interrupted writes) were removed from ``folder``."""
    print(f"note: removed {len(removed)} temporary file(s) left in {folder} by an interrupted write", file=sys.stderr)


def remove_temporary_files(folder: str) -> list:
    """Remove the temporary files an interrupted :func:`atomic_write` left in ``folder``, all but
    those of a process still running (and those of another machine written within
    :data:`STALE_AGE_S`); returns their paths. For a folder held by one process (the training lock),
    where a temporary file without an owner in its name cannot be another's."""
    removed = []
    for path in _temporaries(folder):
        owned = _OWNER.search(os.path.basename(path)) is not None
        if (not owned or is_stale(path)) and _remove_quietly(path):
            removed.append(path)
    return removed


def _remove_all(paths) -> None:
    for path in paths:
        _remove_quietly(path)


def _remove_quietly(path: str) -> bool:
    try:
        os.remove(path)
        return True
    except OSError:
        return False
