"""``glowflow --score`` with what a newcomer hands it, and hostile files: one image, several files,
a folder of one image, unreadable files and FIFOs among readable ones, palette and CMYK images,
few images on the sheet, a full disk; .npz files with a forged header or a zip bomb; detector files
with a NaN threshold, a zero scale, wrong shapes or settings; NaN images; the one-call shipped
detector. Every refusal is one line and exit status 2."""

import contextlib
import csv
import errno
import io
import json
import os
import shutil
import signal
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import glowflow
from glowflow import GlowflowError
from glowflow.checkpoint import Checkpoint
from glowflow.cli import main
from glowflow.data import npzfile
from glowflow.ood import score_command
from glowflow.ood.cache import detector_cache_path_for
from tests.helpers import write_noise_npz, write_smooth_npz


@pytest.fixture(autouse=True)
def no_blocking():
    """A FIFO opened for reading blocks until a writer comes: fail instead of hanging."""

    def stop(signum, frame):
        raise TimeoutError("blocked (a FIFO opened?)")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny checkpoint (1x16x16) with its detector fitted and cached beside it."""
    folder = tmp_path_factory.mktemp("score_inputs")
    smooth = write_smooth_npz(folder / "smooth.npz", n=160, size=16)
    flags = ["--n_epochs", "2", "--batch_size", "16", "--hidden_channels", "8", "--K", "2", "--L", "2"]
    flags += ["--no_wandb", "--sample_and_save_freq", "0", "--warmup", "1", "--lr", "1e-3"]
    assert main(["--train", "--dataset", smooth, "--output_dir", str(folder / "run"), *flags]) == 0
    ckpt = str(folder / "run" / "Glow_smooth.pt")
    noise = write_noise_npz(folder / "noise.npz", n=4, size=16)
    assert main(["--score", noise, "--checkpoint", ckpt, "--output_dir", str(folder / "first")]) == 0
    cache = ckpt.replace(".pt", ".ood_detector_smooth_8bit.npz")
    assert os.path.isfile(cache)
    return ckpt, cache


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _grey(path, seed=0, size=20):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(path)
    return str(path)


def _error_line(capsys):
    err = capsys.readouterr().err
    last = err.rstrip("\n").replace("\r", "\n").split("\n")[-1]
    assert last.startswith("glowflow: error: ") and err.count("glowflow: error") == 1 and "Traceback" not in err, err
    return last


def _refused(args, capsys, fragment):
    assert main(args) == 2
    line = _error_line(capsys)
    assert fragment in line, line
    return line


# ----------------------------------------------------------------------------- what --score accepts


def test_one_image_several_files_and_a_folder_of_one(checkpoint, tmp_path, capsys):
    ckpt, _ = checkpoint
    a = _grey(tmp_path / "a.png", 0)
    b = str(tmp_path / "b.jpg")
    Image.open(_grey(tmp_path / "tmp.png", 1)).save(b)
    one = tmp_path / "one"
    one.mkdir()
    only = _grey(one / "only.png", 2)
    out = tmp_path / "out"
    base = ["--checkpoint", ckpt, "--output_dir", str(out)]

    assert main(["--score", a, *base]) == 0
    rows = _rows(out / "scores_a.csv")
    assert [r["image"] for r in rows] == [a] and rows[0]["unreadable"] == "" and rows[0]["outlier"] in ("0", "1")
    assert (out / "scores_a_sheet.png").exists()

    assert main(["--score", a, b, str(one), *base]) == 0
    rows = _rows(out / "scores_a_and_2_more.csv")
    assert [r["image"] for r in rows] == [a, b, only]
    assert [r["index"] for r in rows] == ["0", "1", "2"]
    assert "scored 3 images of " in capsys.readouterr().out

    assert main(["--score", str(one), *base]) == 0  # one image and no split: scoring needs none
    assert [r["image"] for r in _rows(out / "scores_one.csv")] == [only]


def test_unreadable_files_and_fifos_in_a_folder_are_skipped_and_marked(checkpoint, tmp_path, capsys):
    ckpt, _ = checkpoint
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = [_grey(folder / f"{k}.png", k) for k in (0, 2, 4)]
    (folder / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n damaged")
    os.mkfifo(folder / "3.png")
    out = tmp_path / "out"
    assert main(["--score", str(folder), "--checkpoint", ckpt, "--output_dir", str(out)]) == 0
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if "unreadable" in line]
    assert len(notes) == 1 and "1.png" in notes[0] and "3.png" in notes[0], captured.err
    assert "scored 3 images" in captured.out and "2 unreadable file(s) skipped" in captured.out
    rows = _rows(out / "scores_mixed.csv")
    assert [os.path.basename(r["image"]) for r in rows] == [f"{k}.png" for k in range(5)]
    for r in rows:
        if r["image"] in good:
            assert r["unreadable"] == "" and float(r["dos"]) == float(r["dos"])
        else:
            assert r["unreadable"] and r["dos"] == "" and r["outlier"] == ""
    assert "not a regular file" in rows[3]["unreadable"] and "cannot read image" in rows[1]["unreadable"]

    # a folder whose every image is unreadable, and a FIFO given as the image: one line each
    bad = tmp_path / "bad"
    bad.mkdir()
    os.mkfifo(bad / "x.png")
    _refused(["--score", str(bad), "--checkpoint", ckpt, "--output_dir", str(out)], capsys, "no readable image in")
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    _refused(["--score", str(fifo), "--checkpoint", ckpt, "--output_dir", str(out)], capsys, "not a regular file")


def test_palette_and_cmyk_images_keep_their_file_names(checkpoint, tmp_path):
    ckpt, _ = checkpoint
    folder = tmp_path / "modes"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
    rgb.convert("P", palette=Image.ADAPTIVE).save(folder / "a_palette.png")
    rgb.convert("CMYK").save(folder / "b_cmyk.jpg")
    out = tmp_path / "out"
    assert main(["--score", str(folder), "--checkpoint", ckpt, "--output_dir", str(out)]) == 0
    names = [r["image"] for r in _rows(out / "scores_modes.csv")]
    assert names == [str(folder / "a_palette.png"), str(folder / "b_cmyk.jpg")]


def test_a_sheet_of_few_images_shows_each_once_captioned_by_file_name(checkpoint, tmp_path, monkeypatch):
    ckpt, _ = checkpoint
    for n in (1, 2, 5, 31, 32, 40):
        top, bottom = score_command.extremes(np.arange(n, dtype=float))
        shown = list(top) + list(bottom)
        assert len(shown) == len(set(shown)) == min(n, 2 * score_command.SHEET_IMAGES), n
        assert list(top) == list(range(n - 1, n - 1 - len(top), -1))  # most outlying first
    folder = tmp_path / "few"
    folder.mkdir()
    for k in range(5):
        _grey(folder / f"picture_with_a_long_name_{k}.png", k)
    sheets = []
    render = score_command.render_sheet
    monkeypatch.setattr(score_command, "render_sheet", lambda rows, title: sheets.append(rows) or render(rows, title))
    assert main(["--score", str(folder), "--checkpoint", ckpt, "--output_dir", str(tmp_path / "out")]) == 0
    (rows,) = sheets
    captions = [c.split("\n")[0] for _, _, caps, _ in rows for c in caps]
    assert len(captions) == 5 and len(set(captions)) == 5
    limit = score_command.CAPTION_CHARACTERS
    assert all(c.startswith("pictu") and c.endswith(".png") and len(c) <= limit for c in captions)
    assert score_command.caption("7") == "#7" and score_command.caption("/x/cat.png") == "cat.png"


def test_a_full_disk_writes_neither_the_csv_nor_the_sheet(checkpoint, tmp_path, capsys, monkeypatch):
    ckpt, _ = checkpoint
    image = _grey(tmp_path / "img.png")
    out = tmp_path / "out"
    args = ["--score", image, "--checkpoint", ckpt, "--output_dir", str(out)]
    assert main(args) == 0
    before = {p: (out / p).read_bytes() for p in ("scores_img.csv", "scores_img_sheet.png")}
    _grey(tmp_path / "img.png", seed=9)  # new pixels: new outputs, if they were written
    real = score_command.atomic_output

    @contextlib.contextmanager
    def full_disk(path):
        with real(path) as handle:
            if path.endswith("_sheet.png"):
                raise OSError(errno.ENOSPC, "No space left on device")
            yield handle

    monkeypatch.setattr(score_command, "atomic_output", full_disk)
    line = _refused(args, capsys, "--score wrote nothing: cannot write")
    assert "No space left on device" in line
    assert {p: (out / p).read_bytes() for p in before} == before  # the old pair, untouched
    assert sorted(os.listdir(out)) == sorted(before)  # no temporary file left


# ----------------------------------------------------------------------------- hostile .npz files


def _forged_npz(path, shape, compress=False):
    """A .npz whose images.npy header declares ``shape`` (uint8) but holds a few bytes."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as z:
        z.writestr("images.npy", header.getvalue() + b"\0" * 64)
    return str(path)


def test_a_forged_header_and_a_zip_bomb_are_refused_before_reading(checkpoint, tmp_path, capsys, monkeypatch):
    ckpt, _ = checkpoint
    out = ["--checkpoint", ckpt, "--output_dir", str(tmp_path / "out")]
    huge = _forged_npz(tmp_path / "huge.npz", (2**20, 2**15, 2**15))  # a petabyte of pixels
    line = _refused(["--score", huge, *out], capsys, "refused .npz file")
    assert "nothing was read" in line and "(1048576, 32768, 32768)" in line

    bomb = tmp_path / "bomb.npz"
    np.savez_compressed(bomb, images=np.zeros((64, 256, 256), np.uint8))  # 4 MiB of zeros, a few KiB
    assert os.path.getsize(bomb) < 64 * 1024
    monkeypatch.setattr(npzfile, "EXPANSION_CHECKED_BYTES", 2**20)  # the real floor is 64 MiB

    def no_reading(*args, **kwargs):
        raise AssertionError("np.load was called on a zip bomb")

    monkeypatch.setattr(npzfile.np, "load", no_reading)
    line = _refused(["--score", str(bomb), *out], capsys, "zip bomb")
    assert "4.0 MiB" in line

    # a detector file declaring more than a detector can hold is refused the same way
    monkeypatch.undo()
    detector = _forged_npz(tmp_path / "detector.npz", (2**33,))
    _refused(["--score", huge, "--detector", detector, *out], capsys, "refused .npz file")
    _refused(["--score", _grey(tmp_path / "x.png"), "--detector", detector, *out], capsys, "refused outlier detector")


def test_an_npz_of_the_wrong_kind_is_refused_before_reading(tmp_path):
    np.savez(tmp_path / "floats.npz", images=np.zeros((2, 4, 4), np.float32))
    with pytest.raises(GlowflowError, match="must be uint8"):
        glowflow.data.load_dataset(str(tmp_path / "floats.npz"), "all")
    os.mkfifo(tmp_path / "fifo.npz")
    with pytest.raises(GlowflowError, match="not a regular file"):
        glowflow.data.load_dataset(str(tmp_path / "fifo.npz"), "all")


# ----------------------------------------------------------------------------- detector files


def _edited(cache, path, **changes):
    with np.load(cache, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    for key, change in changes.items():
        arrays[key] = change(arrays[key])
    np.savez(path, **arrays)
    return str(path)


def _nan(a):
    return np.full_like(a, np.nan)


def _zero_first(a):
    a = a.copy()
    a[0] = 0
    return a


def _settings(a):
    values = json.loads(str(a))
    values["batch_size"] = "abc"
    return np.array(json.dumps(values))


BROKEN_DETECTORS = {
    "nan_threshold": (dict(threshold_scores=_nan), "threshold at tpr 0.95 is inf"),
    "zero_std": (dict(dos_std=_zero_first), "dos_std must be positive"),
    "nan_mean": (dict(dos_mean=_nan), "dos_mean holds"),
    "nan_latent": (dict(latent_means=_nan), "latent_means holds"),
    "wrong_means": (dict(dos_means=lambda a: a[:, :-1]), "dos_means has shape"),
    "zero_d_names": (dict(threshold_score_names=lambda a: np.array("dos")), "must be a list of names"),
    "bad_settings": (dict(detector_settings=_settings), "setting batch_size has the wrong type"),
    "negative_diagonal": (dict(dos_precision_cholesky=lambda a: -a), "dos_precision_cholesky must be positive"),
}


@pytest.mark.parametrize("name", list(BROKEN_DETECTORS))
def test_a_broken_detector_file_is_refused_in_one_line(checkpoint, tmp_path, capsys, name):
    ckpt, cache = checkpoint
    changes, fragment = BROKEN_DETECTORS[name]
    broken = _edited(cache, tmp_path / "broken.npz", **changes)
    model = Checkpoint.read(ckpt).load_model("cpu")
    with pytest.raises(GlowflowError, match="unusable outlier detector file") as caught:
        glowflow.OutlierDetector.load(broken, model)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)
    args = ["--score", _grey(tmp_path / "x.png"), "--checkpoint", ckpt, "--detector", broken]
    _refused([*args, "--output_dir", str(tmp_path / "out")], capsys, fragment)
    assert not (tmp_path / "out").exists()


def test_a_fifo_given_as_the_detector_is_refused_without_blocking(checkpoint, tmp_path, capsys):
    ckpt, _ = checkpoint
    fifo = tmp_path / "detector.npz"
    os.mkfifo(fifo)
    args = ["--score", _grey(tmp_path / "x.png"), "--checkpoint", ckpt, "--detector", str(fifo)]
    _refused([*args, "--output_dir", str(tmp_path / "out")], capsys, "not a regular file")


def test_a_broken_cache_beside_the_checkpoint_is_refitted_with_a_note(checkpoint, tmp_path, capsys):
    ckpt, cache = checkpoint
    copy = str(tmp_path / "model.pt")
    shutil.copy(ckpt, copy)
    own_cache = copy.replace(".pt", ".ood_detector_smooth_8bit.npz")
    image = _grey(tmp_path / "x.png")
    for name in ("nan_threshold", "zero_std"):
        _edited(cache, own_cache, **BROKEN_DETECTORS[name][0])
        assert main(["--score", image, "--checkpoint", copy, "--output_dir", str(tmp_path / name)]) == 0
        printed = capsys.readouterr().out
        notes = [line for line in printed.splitlines() if "ignoring the cached outlier detector" in line]
        assert len(notes) == 1 and BROKEN_DETECTORS[name][1] in notes[0], printed
        assert f"wrote {own_cache}" in printed
        rows = _rows(tmp_path / name / "scores_x.csv")
        assert np.isfinite(float(rows[0]["dos"])) and np.isfinite(float(rows[0]["decision"]))
    model = Checkpoint.read(copy).load_model("cpu")
    assert np.isfinite(glowflow.OutlierDetector.load(own_cache, model).threshold_)  # the refitted cache


def test_fitting_on_nan_images_is_a_one_line_error(checkpoint):
    ckpt, _ = checkpoint
    model = Checkpoint.read(ckpt).load_model("cpu")
    images = torch.rand(40, 1, 16, 16)
    for bad in (float("nan"), float("inf")):
        images[3, 0, 0, 0] = bad
        with pytest.raises(GlowflowError, match="not numbers|must lie in"):
            glowflow.OutlierDetector(model, fit_images=40).fit(images)


# ----------------------------------------------------------------------------- the one-call API


def test_the_shipped_detector_loads_in_one_call():
    detector = glowflow.OutlierDetector.from_pretrained("fashionmnist", tpr=0.9)
    assert isinstance(detector.model, glowflow.Glow) and detector.tpr == 0.9 and detector.score == "combined"
    shipped = detector_cache_path_for("pretrained:fashionmnist", "fashionmnist", 8)
    by_hand = glowflow.OutlierDetector.load(shipped, detector.model).set_params(tpr=0.9)
    assert by_hand.threshold_ == detector.threshold_ and np.isfinite(detector.threshold_)
    images = torch.rand(2, 1, 32, 32).mul(255).round().div(255)
    assert detector.predict(images).tolist() == [-1, -1]  # noise is no Fashion-MNIST


def test_a_model_folder_without_a_detector_says_how_to_get_one(checkpoint, tmp_path):
    ckpt, cache = checkpoint
    folder = tmp_path / "exported"
    assert main(["--export", str(folder), "--checkpoint", ckpt]) == 0
    with pytest.raises(GlowflowError, match="holds no fitted outlier detector"):
        glowflow.OutlierDetector.from_pretrained(str(folder))
    shutil.copy(cache, folder / "ood_detector_smooth_8bit.npz")
    detector = glowflow.OutlierDetector.from_pretrained(str(folder))
    assert detector.n_threshold_ >= 1 and np.isfinite(detector.threshold_)
