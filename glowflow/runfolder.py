"""The output folder of a training run: who may write there, what a new run may replace, and what a
failed run leaves behind.

* :class:`RunLock` -- one run at a time per output folder (``.glowflow.lock``, held by rank 0 for
  the whole run and released by the OS when the process dies).
* :class:`RunFolder` -- the folder's life in one run. :meth:`RunFolder.check_unused`, before any
  work: a new run (not ``--resume``) is refused in one line where a previous run has left a
  checkpoint or metrics rows, unless ``--overwrite`` says to replace them. :meth:`RunFolder.claim`
  locks the folder (making it if needed), removes what interrupted writes left, and with
  ``--overwrite`` the previous run's files. :meth:`RunFolder.release` unlocks it; after a failed
  run that wrote no checkpoint it also removes what the run wrote: the whole folder if the run
  made it, else the run's own files. A checkpoint is never removed (but by ``--overwrite``).
"""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import shutil
import socket
import sys
import time
from typing import List, Optional

try:
    import fcntl
except ImportError:  # not a POSIX system: runs are not locked
    fcntl = None

from glowflow.errors import GlowflowError
from glowflow.files import check_writable_folder, remove_temporary_files

CHECKPOINT_PATTERNS = ("last.pt", "Glow_*.pt")
"""The checkpoints a training run writes: work that is never thrown away."""
RECORD_PATTERNS = ("metrics.csv", "steps.csv", "training_curves.png", "samples_epoch*.png")
"""The other files a training run writes into its folder (besides the lock, TensorBoard's and
wandb's folders): its records, worth keeping only beside a checkpoint."""


LOCK_NAME = ".glowflow.lock"


class RunLock:
    """An exclusive lock on an output folder, held for a whole run.

    ``flock`` on ``<folder>/.glowflow.lock``, which also says who holds it (pid, host, start time,
    command line, as one JSON line). The operating system releases the lock when the process ends,
    however it ends, so a killed run never leaves its folder locked; the file itself stays (deleting
    it would let two runs lock two different files). Without ``fcntl`` (not POSIX) nothing is locked.
    """

    def __init__(self, path: str, fd: Optional[int]):
        self.path, self.fd = path, fd

    @classmethod
    def acquire(cls, folder: str) -> RunLock:
        """The lock of ``folder`` (made if missing); GlowflowError naming the holder if another
        run has it."""
        path = os.path.join(folder, LOCK_NAME)
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as err:
            raise GlowflowError(f"cannot write to output directory {folder}: {err.strerror or err}") from None
        if fcntl is None:
            return cls(path, None)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise GlowflowError(f"cannot create the lock file {path}: {err.strerror or err}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise GlowflowError(
                f"{folder} is in use by another glowflow run ({holder}); wait for it to end or choose "
                f"another --output_dir"
            ) from None
        except OSError as err:  # a file system without locks
            os.close(fd)
            raise GlowflowError(f"cannot lock {path}: {err.strerror or err}") from None
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": shlex.join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode("utf-8"), 0)
        return cls(path, fd)

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _lock_holder(fd: int) -> str:
    """Who holds a lock, in words, from its file: 'pid 12, host h, started T: COMMAND'."""
    try:
        holder = json.loads(os.pread(fd, 65536, 0).decode("utf-8"))
        return (
            f"pid {holder['pid']} on host {holder['host']}, started {holder['started']}: "
            f"{' '.join(str(holder['command']).split())}"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return "its details are unknown"


class RunFolder:
    """The output folder of one training run (on the main process): checked before any work,
    claimed (locked) once the data and model are found good, released when the run ends."""

    def __init__(self, path: str):
        self.path = path
        self.lock: Optional[RunLock] = None
        self.made = False  # whether this run made the folder
        self.made_lock_file = False

    def previous_run(self) -> List[str]:
        """The names of the files that show a previous run in the folder: its checkpoints, and
        metrics.csv if it holds a row (a header alone is what a run that failed at once leaves)."""
        found = sorted(name for name in _names(self.path) if _matches(name, CHECKPOINT_PATTERNS))
        if _has_rows(os.path.join(self.path, "metrics.csv")):
            found.append("metrics.csv")
        return found

    def check_unused(self, resuming: bool, overwrite: bool) -> None:
        """GlowflowError (one line) for a new run into a folder that holds a previous run, unless
        ``overwrite``; and for ``--resume`` with ``--overwrite``."""
        if resuming and overwrite:
            raise GlowflowError("--resume continues a run and --overwrite replaces it: give one of them")
        if resuming or overwrite:
            return
        found = self.previous_run()
        if found:
            shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
            raise GlowflowError(
                f"{self.path} already holds a training run ({shown}): continue it with --resume, or replace it "
                f"with --overwrite (or choose another --output_dir)"
            )

    def claim(self, overwrite: bool) -> None:
        """Lock the folder (making it if needed), remove the temporary files interrupted writes left
        there and, with ``overwrite``, the files of the run it held; a note on stderr for each."""
        check_writable_folder(self.path)
        self.made = not os.path.isdir(self.path)
        self.made_lock_file = not os.path.lexists(os.path.join(self.path, LOCK_NAME))
        self.lock = RunLock.acquire(self.path)
        removed = remove_temporary_files(self.path)
        if removed:
            _note(f"removed {len(removed)} temporary file(s) left in {self.path} by an interrupted write")
        if overwrite:
            replaced = self._remove_matching(CHECKPOINT_PATTERNS + RECORD_PATTERNS)
            if replaced:
                _note(f"--overwrite: removed the previous run's {len(replaced)} file(s) from {self.path}")

    def release(self, failed: bool = False) -> None:
        """Unlock the folder (safe to repeat). After a failed run (``failed``) that left no
        checkpoint in it, first remove what the run wrote: the folder itself if the run made it,
        else its records (and the lock file, if the run made that)."""
        if self.lock is None:
            return
        try:
            if failed and not any(_matches(name, CHECKPOINT_PATTERNS) for name in _names(self.path)):
                self._remove_leftovers()
        finally:
            self.lock.release()
            self.lock = None

    def _remove_leftovers(self) -> None:
        if self.made:
            shutil.rmtree(self.path, ignore_errors=True)
            if not os.path.exists(self.path):
                _note(f"removed {self.path}: the run failed before it wrote a checkpoint")
            return
        self._remove_matching(RECORD_PATTERNS + ((LOCK_NAME,) if self.made_lock_file else ()))

    def _remove_matching(self, patterns) -> List[str]:
        removed = []
        for name in _names(self.path):
            path = os.path.join(self.path, name)
            if _matches(name, patterns) and os.path.isfile(path):
                try:
                    os.remove(path)
                    removed.append(name)
                except OSError:
                    pass
        return removed


def _names(folder: str) -> List[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _has_rows(csv_path: str) -> bool:
    """Whether the CSV file holds a non-empty line after its header."""
    try:
        with open(csv_path, "rb") as handle:
            lines = handle.read(1 << 16).splitlines()
    except OSError:
        return False
    return any(line.strip() for line in lines[1:])


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)
