"""Atomic writes on a full disk (an OSError, or torch's RuntimeError around one), several files
written as one, the temporary files of killed writers, and the output-folder check: a one-line
error, no temporary file left, the previous file intact, nothing created by the check, a running
writer's temporary file never removed."""

import errno
import os
import subprocess
import sys
import time

import pytest
import torch
import torchvision.utils

from glowflow import Glow, GlowConfig
from glowflow.checkpoint import save_checkpoint
from glowflow.errors import GlowflowError
from glowflow.files import (
    TEMP_PREFIX,
    atomic_write,
    atomic_write_text,
    check_writable_folder,
    folder_update,
    remove_stale_temporaries,
    remove_temporary_files,
    temporary_name,
)
from glowflow.pixels import save_grid


def _disk_full_after_some_bytes(handle, *args, **kwargs):
    handle.write(b"half a file")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _assert_only(folder, name, content):
    assert os.listdir(folder) == [name], os.listdir(folder)  # no temporary file left
    assert (folder / name).read_bytes() == content


def test_full_disk_while_saving_a_checkpoint(tmp_path, monkeypatch):
    model = Glow(GlowConfig(image_shape=(1, 8, 8), hidden_channels=4, K=1, L=1))
    path = tmp_path / "last.pt"
    save_checkpoint(str(path), model, step=1)
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", lambda obj, handle, *a, **k: _disk_full_after_some_bytes(handle))
    with pytest.raises(GlowflowError, match="cannot write .*last.pt: No space left on device"):
        save_checkpoint(str(path), model, step=2)
    _assert_only(tmp_path, "last.pt", before)


def test_full_disk_while_saving_a_picture(tmp_path, monkeypatch):
    path = tmp_path / "samples.png"
    save_grid(torch.zeros(4, 1, 8, 8), 8, str(path), nrow=2)
    before = path.read_bytes()
    monkeypatch.setattr(
        torchvision.utils, "save_image", lambda images, handle, *a, **k: _disk_full_after_some_bytes(handle)
    )
    with pytest.raises(GlowflowError, match="cannot write .*samples.png: No space left on device"):
        save_grid(torch.ones(4, 1, 8, 8), 8, str(path), nrow=2)
    _assert_only(tmp_path, "samples.png", before)


def test_check_writable_folder_creates_nothing(tmp_path):
    check_writable_folder(str(tmp_path / "new" / "deeper"))
    check_writable_folder(str(tmp_path))
    assert os.listdir(tmp_path) == []
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for folder in (blocker, blocker / "sub"):
        with pytest.raises(GlowflowError, match=f"cannot write to output directory .*: {blocker} is not a folder"):
            check_writable_folder(str(folder))


def test_check_writable_folder_refuses_a_folder_it_cannot_write(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr("tempfile.mkstemp", refuse)
    with pytest.raises(GlowflowError, match="cannot write to output directory .*: Permission denied"):
        check_writable_folder(str(tmp_path / "out"))
    assert not any(name.startswith(TEMP_PREFIX) for name in os.listdir(tmp_path))


def test_atomic_files_get_the_mode_open_would_give(tmp_path):
    import os

    from glowflow.files import atomic_write_text

    previous = os.umask(0o022)
    try:
        path = atomic_write_text(str(tmp_path / "report.json"), "{}\n")
    finally:
        os.umask(previous)
    assert os.stat(path).st_mode & 0o777 == 0o644  # readable by others, as a file written with open()


# ----------------------------------------------------------------------------- torch's own report of a full disk


class _DiskFullAfter:
    """A write-only file that takes ``room`` bytes, then fails as a full disk does."""

    def __init__(self, handle, room):
        self.handle, self.room = handle, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.handle.write(data)

    def flush(self):
        self.handle.flush()


def test_torch_runtime_error_on_a_full_disk_is_a_write_failure(tmp_path, monkeypatch):
    """torch.save wraps the OSError of a failed write in a RuntimeError ('unexpected pos'): the real
    torch.save onto a file that fills up after 100 bytes is one line, nothing half-written."""
    model = Glow(GlowConfig(image_shape=(1, 8, 8), hidden_channels=4, K=1, L=1))
    path = tmp_path / "last.pt"
    save_checkpoint(str(path), model, step=1)
    before = path.read_bytes()
    real_save = torch.save

    def save_onto_a_full_disk(obj, handle, *args, **kwargs):
        real_save(obj, _DiskFullAfter(handle, 100), *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_onto_a_full_disk)
    with pytest.raises(RuntimeError) as raw:  # what torch itself raises, which glowflow catches
        torch.save({"a": torch.zeros(1000)}, open(os.devnull, "wb"))
    assert isinstance(raw.value.__context__, OSError)
    with pytest.raises(GlowflowError, match="cannot write .*last.pt: No space left on device") as raised:
        save_checkpoint(str(path), model, step=2)
    assert len(str(raised.value).splitlines()) == 1
    _assert_only(tmp_path, "last.pt", before)


def test_torch_file_write_failed_without_a_cause_is_a_write_failure(tmp_path, monkeypatch):
    def fail(obj, handle, *args, **kwargs):
        handle.write(b"half a file")
        raise RuntimeError(
            "[enforce fail at inline_container.cc:672] . "
            "PytorchStreamWriter failed writing file data/0: file write failed"
        )

    model = Glow(GlowConfig(image_shape=(1, 8, 8), hidden_channels=4, K=1, L=1))
    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(GlowflowError, match=r"cannot write .*last.pt: the write failed \(is the disk full\?\)"):
        save_checkpoint(str(tmp_path / "last.pt"), model, step=2)
    assert os.listdir(tmp_path) == []


def test_another_runtime_error_is_not_taken_for_a_write_failure(tmp_path, monkeypatch):
    def fail(obj, handle, *args, **kwargs):
        handle.write(b"half a file")
        raise RuntimeError("a bug")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(RuntimeError, match="a bug"):
        save_checkpoint(str(tmp_path / "last.pt"), Glow(GlowConfig(image_shape=(1, 8, 8), hidden_channels=4, K=1, L=1)))
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- several files as one


def test_a_failed_folder_update_puts_back_what_was_there(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("a", "d"):
        (folder / name).write_bytes(b"old " + name.encode())
    (folder / "other").write_bytes(b"not ours")
    with pytest.raises(GlowflowError, match="No space left on device"):
        with folder_update(str(folder), ("a", "b", "c", "d")):
            atomic_write_text(str(folder / "a"), "new a")  # replaced, then put back
            atomic_write_text(str(folder / "b"), "new b")  # created, then removed
            atomic_write(str(folder / "c"), _disk_full_after_some_bytes)  # d: never reached
    assert sorted(os.listdir(folder)) == ["a", "d", "other"]  # no backup left
    assert (folder / "a").read_bytes() == b"old a" and (folder / "d").read_bytes() == b"old d"
    assert (folder / "other").read_bytes() == b"not ours"
    with folder_update(str(folder), ("a", "b")):  # a whole update keeps the new files and no backup
        atomic_write_text(str(folder / "a"), "new a")
        atomic_write_text(str(folder / "b"), "new b")
    assert sorted(os.listdir(folder)) == ["a", "b", "d", "other"] and (folder / "a").read_text() == "new a"


def test_a_failed_folder_update_removes_the_folders_it_made(tmp_path):
    folder = tmp_path / "new" / "deeper"
    with pytest.raises(KeyboardInterrupt):
        with folder_update(str(folder), ("a",)):
            atomic_write_text(str(folder / "a"), "new a")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- temporary files of killed writers

WRITER = """
import sys, time
from glowflow.files import atomic_output
with atomic_output(sys.argv[1]) as handle:
    handle.write(b"half a file")
    handle.flush()
    print("writing", flush=True)
    time.sleep(600)
"""


def _start_writer(path):
    """A process in the middle of an atomic write of ``path`` (its temporary file exists)."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    return proc


def _temporaries(folder):
    return sorted(name for name in os.listdir(folder) if name.startswith(TEMP_PREFIX))


def test_a_killed_writers_temporary_file_goes_and_a_live_ones_stays(tmp_path, capsys):
    killed, alive = _start_writer(tmp_path / "killed.pt"), _start_writer(tmp_path / "alive.pt")
    try:
        killed.kill()  # kill -9: no chance to clean up
        killed.wait()
        left = _temporaries(tmp_path)
        assert len(left) == 2 and any(f"~{killed.pid}@" in name for name in left), left
        atomic_write_text(str(tmp_path / "report.json"), "{}\n")  # any later write into the folder
        kept = _temporaries(tmp_path)
        assert len(kept) == 1 and f"~{alive.pid}@" in kept[0], kept
        assert "removed 1 temporary file(s)" in capsys.readouterr().err
        assert remove_stale_temporaries(str(tmp_path)) == [] and remove_temporary_files(str(tmp_path)) == []
        assert _temporaries(tmp_path) == kept  # a running writer's file is never removed
    finally:
        alive.kill()
        alive.wait()
    assert [os.path.basename(p) for p in remove_stale_temporaries(str(tmp_path))] == kept
    assert sorted(os.listdir(tmp_path)) == ["report.json"]


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_which_temporary_files_are_stale(tmp_path):
    day = 24 * 3600
    here = temporary_name("x").rpartition("@")[2]
    files = {
        f".tmp-a-1234~{_dead_pid()}@{here}": (0, True),  # its process is gone
        f".tmp-b-1234~{os.getpid()}@{here}": (2 * day, False),  # this process's own, however old
        ".tmp-c-1234~1@another-host": (0, False),  # another machine's: cannot ask
        ".tmp-d-1234~1@another-host": (2 * day, True),  # ... unless a day old
        ".tmp-e-abcd1234": (0, False),  # an older glowflow's (no owner): only when a day old
        ".tmp-f-abcd1234": (2 * day, True),
    }
    for name, (age, _) in files.items():
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (time.time() - age, time.time() - age))
    (tmp_path / ".tmp-dir").mkdir()  # a folder is never touched
    removed = {os.path.basename(p) for p in remove_stale_temporaries(str(tmp_path))}
    assert removed == {name for name, (_, stale) in files.items() if stale}
