"""Atomic writes on a full disk, and the output-folder check: a one-line error, no temporary file
left, the previous file intact, nothing created by the check."""

import errno
import os

import pytest
import torch
import torchvision.utils

from glowflow import Glow
from glowflow.checkpoint import save_checkpoint
from glowflow.errors import GlowflowError
from glowflow.files import TEMP_PREFIX, check_writable_folder
from glowflow.pixels import save_grid


def _disk_full_after_some_bytes(handle, *args, **kwargs):
    handle.write(b"half a file")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _assert_only(folder, name, content):
    assert os.listdir(folder) == [name], os.listdir(folder)  # no temporary file left
    assert (folder / name).read_bytes() == content


def test_full_disk_while_saving_a_checkpoint(tmp_path, monkeypatch):
    model = Glow(image_shape=(1, 8, 8), hidden_channels=4, K=1, L=1)
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
