"""Training never loses work and never reports a wrong result with exit 0: kills at every point of
the end-of-epoch writes, leftover temporary files, the output-folder lock, SIGTERM, divergence
(across epochs and in evaluation), where a resumed run writes, and labels the model cannot take."""

import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from matplotlib.axes import Axes
from PIL import Image

from glowflow.cli import main
from glowflow.curves import curve_series
from glowflow.tracking import METRIC_COLUMNS, plot_curves
from tests.helpers import interrupt_training, same_checkpoint_weights, write_smooth_npz

ARCH = ["--hidden_channels", "8", "--K", "2", "--L", "2", "--no_wandb"]
TINY = ["--batch_size", "16", *ARCH, "--warmup", "1"]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def smooth(tmp_path_factory):
    return write_smooth_npz(tmp_path_factory.mktemp("data") / "smooth.npz")


def _rows(folder):
    lines = (folder / "metrics.csv").read_text().splitlines()
    assert lines[0] == "epoch,step,train_bpd,val_bpd,test_bpd,raw_val_bpd,lr,images_per_s,seconds"
    return [line.split(",") for line in lines[1:]]


def _temporary_files(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".tmp-"))


# ----------------------------------------------------------------------------- kills during the end-of-epoch writes


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, and not the KeyboardInterrupt that saves last.pt."""


WRITES = ["--n_epochs", "2", "--sample_and_save_freq", "1", *TINY]


@pytest.fixture(scope="module")
def uninterrupted(smooth, tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    assert main(["--train", "--dataset", smooth, "--output_dir", str(folder), *WRITES]) == 0
    return folder


def _kill_at_write(monkeypatch, k):
    """From now on the k-th end-of-epoch write (best checkpoint, last.pt, metrics row or sample
    grid, counted together) is killed half-way: a checkpoint or grid leaves its temporary file, a
    metrics row is cut short. Returns a dict whose 'armed' entry turns the killing off."""
    import glowflow.training.trainer as train_module
    from glowflow.tracking import Tracker

    state = {"calls": 0, "armed": True, "killed": None}

    def killing(real, kind):
        def write(*args, **kwargs):
            if state["armed"]:
                state["calls"] += 1
                if state["calls"] == k:
                    if kind == "row":
                        with open(args[0].csv_path, "a") as handle:
                            handle.write("2,12,7.1")
                    else:
                        path = str(args[0] if kind == "checkpoint" else args[2])
                        folder, name = os.path.split(path)
                        with open(os.path.join(folder, f".tmp-{name}-killed"), "wb") as handle:
                            handle.write(b"half a file")
                    state["killed"] = kind
                    raise Killed()
            return real(*args, **kwargs)

        return write

    monkeypatch.setattr(train_module, "save_checkpoint", killing(train_module.save_checkpoint, "checkpoint"))
    monkeypatch.setattr(train_module, "save_grid", killing(train_module.save_grid, "grid"))
    monkeypatch.setattr(Tracker, "log_epoch", killing(Tracker.log_epoch, "row"))
    return state


@pytest.mark.parametrize("k", range(1, 9))
def test_a_kill_at_any_point_of_the_epoch_writes_loses_nothing(smooth, uninterrupted, tmp_path, capsys, monkeypatch, k):
    run = tmp_path / "run"
    argv = ["--train", "--dataset", smooth, "--output_dir", str(run), *WRITES]
    state = _kill_at_write(monkeypatch, k)
    with pytest.raises(Killed):
        main(argv)
    state["armed"] = False
    capsys.readouterr()

    resumable = (run / "last.pt").exists()
    assert main(argv + (["--resume"] if resumable else ["--overwrite"])) == 0  # no last.pt: start again
    out, err = capsys.readouterr()
    if state["killed"] != "row":
        assert "note: removed 1 temporary file(s) left in" in err
    assert _temporary_files(run) == []

    # metrics.csv: exactly one row per epoch, the uninterrupted run's (but for timings)
    rows, expected = _rows(run), _rows(uninterrupted)
    assert [r[:7] for r in rows] == [r[:7] for r in expected]

    # the best checkpoint is on disk, and it is the one the run reports: chosen on validation
    best = torch.load(run / "Glow_smooth.pt", weights_only=True)
    reported = float(out.split("done: best validation bits/dim ")[1].split()[0])
    assert best["best_val_bpd"] == pytest.approx(reported, abs=5e-5)
    assert best["best_val_bpd"] == torch.load(run / "last.pt", weights_only=True)["best_val_bpd"]
    assert best["best_val_bpd"] == pytest.approx(min(float(r[3]) for r in rows), abs=1e-6)
    assert same_checkpoint_weights(run / "Glow_smooth.pt", uninterrupted / "Glow_smooth.pt")

    # and the final weights are the uninterrupted run's, bit for bit; so are the sample grids
    assert same_checkpoint_weights(run / "last.pt", uninterrupted / "last.pt")
    for name in ("samples_epoch001.png", "samples_epoch002.png"):
        assert (run / name).read_bytes() == (uninterrupted / name).read_bytes(), name


def test_resume_drops_metrics_rows_beyond_the_checkpoint(tmp_path):
    from glowflow.tracking import METRIC_COLUMNS, drop_rows_after

    path = tmp_path / "metrics.csv"
    header = ",".join(METRIC_COLUMNS)
    lines = [header, "0,4,7,7,7,,0.1,1,1", "1,6,7,7,7,,0.1,1,1", "2,12,7,7,7,,0.1,1,1", "2,12,7,7"]
    path.write_text("\r\n".join(lines) + "\r\n")
    assert drop_rows_after(str(path), 1, 6) == 2  # the row beyond step 6, and the one with too few values
    assert path.read_text().splitlines() == lines[:3]
    path.write_text("\r\n".join(lines[:3]) + "\r\n1,12,7.")  # a last row cut short
    assert drop_rows_after(str(path), 2, 12) == 1
    assert path.read_text().splitlines() == lines[:3]
    assert drop_rows_after(str(path), 2, 12) == 0
    assert drop_rows_after(str(path), 0, 6) == 1  # same step, a later epoch: beyond
    assert path.read_text().splitlines() == lines[:2]


# ----------------------------------------------------------------------------- the output-folder lock

HOLDER = textwrap.dedent(
    """
    import sys, time
    from glowflow.runfolder import RunLock
    lock = RunLock.acquire(sys.argv[1])
    print("held", flush=True)
    time.sleep(600)
    """
)


def _hold_lock(folder, tmp_path):
    """A second process holding ``folder``'s lock, started by a command line that names it."""
    script = tmp_path / "hold_the_lock.py"
    script.write_text(HOLDER)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(folder), "--marker"], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_on_a_busy_output_dir_is_refused(smooth, tmp_path, capsys):
    import socket

    from glowflow.runfolder import RunLock

    run = tmp_path / "busy"
    run.mkdir()
    argv = ["--train", "--dataset", smooth, "--output_dir", str(run), "--max_steps", "2", *TINY]
    holder = _hold_lock(run, tmp_path)
    try:
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert f"{run} is in use by another glowflow run" in err
        assert f"pid {holder.pid} on host {socket.gethostname()}, started " in err
        assert "hold_the_lock.py" in err and "--marker" in err  # its command line
        assert not (run / "metrics.csv").exists() and not (run / "last.pt").exists()
    finally:
        holder.kill()  # killed: the operating system releases its lock
        holder.wait()
    assert main(argv) == 0
    assert (run / "last.pt").exists()
    RunLock.acquire(str(run)).release()  # the finished run released it too


# ----------------------------------------------------------------------------- SIGTERM


def test_sigterm_saves_last_checkpoint_and_the_run_resumes(smooth, tmp_path, capsys):
    run, reference = tmp_path / "terminated", tmp_path / "reference"
    flags = ["--n_epochs", "1000", "--sample_and_save_freq", "0", *TINY]
    returncode, err = interrupt_training(run, ["--dataset", smooth, *flags], signal.SIGTERM)
    assert returncode == 130, err[-2000:]
    assert "interrupted at step" in err and f"--resume {run / 'last.pt'}" in err
    saved = torch.load(run / "last.pt", weights_only=True)
    assert saved["step"] >= 4  # an epoch: 77 of smooth's 96 images train (10 test, 9 validation)

    # resumed past the next epoch's end (the lock went with the killed process): the weights of an
    # uninterrupted run, and one metrics row per epoch
    end = saved["step"] + 9
    resume = ["--resume", "--max_steps", str(end), "--no_wandb", "--sample_and_save_freq", "0"]
    assert main(["--train", "--dataset", smooth, "--output_dir", str(run), *resume]) == 0
    assert main(["--train", "--dataset", smooth, "--output_dir", str(reference), *flags, "--max_steps", str(end)]) == 0
    assert same_checkpoint_weights(run / "last.pt", reference / "last.pt")
    assert [r[:2] for r in _rows(run)] == [r[:2] for r in _rows(reference)]
    assert _temporary_files(run) == []


def test_the_previous_signal_handlers_are_restored(smooth, tmp_path):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    run = tmp_path / "run"
    assert main(["--train", "--dataset", smooth, "--output_dir", str(run), "--max_steps", "1", *TINY]) == 0
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def _wait_for(condition, failure, timeout=60.0):
    """Sleep in short steps until ``condition()`` holds, or fail with ``failure`` after ``timeout``
    seconds. A signal a process sends itself need not be handled by the time os.kill returns: the
    kernel may hand it to another thread, whose C handler only flags it for the main thread's Python
    handler, and on a loaded machine that thread may wait long for a CPU. Sleeping lets the main
    thread run the handler as soon as the flag is up (at once on an idle machine); a fixed window
    (the next line of code) made this test fail once under load ("not interrupted")."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{failure} within {timeout:.0f} s")
        time.sleep(0.005)


def test_a_stop_signal_waits_for_the_state_to_be_whole():
    from glowflow.training import StopSignals

    signals = StopSignals()
    signals.install()
    done = False
    try:
        with pytest.raises(KeyboardInterrupt):
            with signals.held():
                os.kill(os.getpid(), signal.SIGTERM)
                # handled inside the block: remembered, not raised
                _wait_for(lambda: signals.pending == signal.SIGTERM, "SIGTERM was not handled")
                done = True  # reached: the signal waits for the end of the block
        assert done and not signals.broke_in and signals.pending is None
        with pytest.raises(KeyboardInterrupt):
            with signals.held():
                os.kill(os.getpid(), signal.SIGTERM)
                _wait_for(lambda: signals.pending == signal.SIGTERM, "SIGTERM was not handled")
                os.kill(os.getpid(), signal.SIGINT)  # a second signal stops at once
                _wait_for(lambda: False, "not interrupted by a second signal")
        assert signals.broke_in
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)  # outside a held block: at once
            _wait_for(lambda: False, "not interrupted outside a held block")
    finally:
        signals.restore()


# ----------------------------------------------------------------------------- divergence


def test_constant_images_at_a_huge_learning_rate_stop_with_an_error(tmp_path, capsys):
    data = tmp_path / "const.npz"
    np.savez(data, images=np.full((32, 16, 16), 128, dtype=np.uint8))
    run = tmp_path / "const"
    argv = ["--train", "--dataset", str(data), "--output_dir", str(run), *ARCH, "--batch_size", "8"]
    code = main([*argv, "--n_epochs", "5", "--lr", "10", "--warmup", "0", "--sample_and_save_freq", "0"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err.startswith("glowflow: error:") and "training diverged" in err, err
    assert f"no checkpoint was written to {run}" in err and "last good checkpoint" not in err
    assert not (run / "last.pt").exists() and not (run / "Glow_const.pt").exists()


def test_non_finite_steps_in_a_row_are_counted_across_epochs_and_resumes(smooth, tmp_path, capsys, monkeypatch):
    from glowflow.model import Glow

    real_forward = Glow.forward
    # every training step is non-finite; evaluation (Glow.log_prob) stays finite
    monkeypatch.setattr(Glow, "forward", lambda self, x, y=None: (real_forward(self, x, y)[0] * float("nan"), None))
    run = tmp_path / "nan"
    argv = ["--train", "--dataset", smooth, "--output_dir", str(run), *ARCH, "--batch_size", "24"]
    argv += ["--sample_and_save_freq", "0"]  # 3 steps an epoch (77 training images), at most 5 skipped in a row
    assert main([*argv, "--n_epochs", "1"]) == 0
    payload = torch.load(run / "last.pt", weights_only=True)
    assert payload["nonfinite_steps"] == 3 and payload["nonfinite_in_a_row"] == 3
    before = (run / "last.pt").read_bytes()
    capsys.readouterr()

    code = main([*argv, "--n_epochs", "5", "--resume"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "5 non-finite losses or gradients in a row at step 5" in err, err
    assert f"the last good checkpoint is kept in {run} (last.pt)" in err
    assert (run / "last.pt").read_bytes() == before

    # the same from a fresh start, over small epochs
    fresh = tmp_path / "fresh"
    code = main([*argv, "--n_epochs", "5", "--output_dir", str(fresh)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "5 non-finite losses or gradients in a row at step 5" in err, err
    assert torch.load(fresh / "last.pt", weights_only=True)["step"] == 3


def test_a_non_finite_evaluation_stops_the_run_and_keeps_the_last_good_checkpoint(
    smooth, tmp_path, capsys, monkeypatch
):
    from glowflow.model import Glow

    real_log_prob = Glow.log_prob
    evaluations = {"n": 0}

    def log_prob(self, x, y=None):
        result = real_log_prob(self, x, y)
        if not self.training:
            evaluations["n"] += 1
            if evaluations["n"] > 2:  # the first epoch's evaluations (validation, test) are finite, the second's not
                return result * float("inf")
        return result

    monkeypatch.setattr(Glow, "log_prob", log_prob)
    run = tmp_path / "inf"
    code = main(["--train", "--dataset", smooth, "--output_dir", str(run), "--n_epochs", "3", *TINY])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "the validation bits/dim after step 8 is" in err and "training diverged" in err, err
    assert f"the last good checkpoint is kept in {run} (last.pt)" in err
    for name in ("last.pt", "Glow_smooth.pt"):
        payload = torch.load(run / name, weights_only=True)
        assert payload["epoch"] == 1 and payload["step"] == 4 and np.isfinite(payload["best_val_bpd"]), name
    assert [r[0] for r in _rows(run)] == ["1"]


# ----------------------------------------------------------------------------- where a resumed run writes


def test_resume_writes_next_to_the_checkpoint_not_where_the_file_says(smooth, tmp_path, capsys):
    first = tmp_path / "first"
    assert main(["--train", "--dataset", smooth, "--output_dir", str(first), "--max_steps", "2", *TINY]) == 0
    payload = torch.load(first / "last.pt", weights_only=True)
    elsewhere = tmp_path / "elsewhere"
    payload["run_config"]["output_dir"] = str(elsewhere)
    received = tmp_path / "received"
    received.mkdir()
    torch.save(payload, received / "last.pt")
    capsys.readouterr()

    assert main(["--train", "--resume", str(received / "last.pt"), "--max_steps", "4", "--no_wandb"]) == 0
    assert f"output {received}" in capsys.readouterr().out
    assert not elsewhere.exists()
    assert torch.load(received / "last.pt", weights_only=True)["step"] == 4

    chosen = tmp_path / "chosen"
    argv = ["--train", "--resume", str(received / "last.pt"), "--max_steps", "6", "--no_wandb"]
    assert main([*argv, "--output_dir", str(chosen)]) == 0
    assert torch.load(chosen / "last.pt", weights_only=True)["step"] == 6
    assert not elsewhere.exists()


# ----------------------------------------------------------------------------- labels


def test_labels_beyond_num_classes_are_one_line_errors(tmp_path, capsys):
    data = tmp_path / "labels.npz"
    write_smooth_npz(data, n=48, num_classes=6)
    assert np.load(data)["labels"].max() == 5
    run = tmp_path / "never"
    argv = ["--train", "--dataset", str(data), "--output_dir", str(run), *TINY, "--y_condition", "--num_classes", "3"]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "labels" in err and "go up to 5" in err and "num_classes 3" in err
    assert not run.exists()
    assert main([*argv[:-1], "6", "--max_steps", "1"]) == 0  # enough classes: trains


def test_training_curves_are_drawn_from_metrics_csv(tmp_path, monkeypatch):
    path = tmp_path / "metrics.csv"
    header = ",".join(METRIC_COLUMNS)
    assert path.write_text(header + "\n") and plot_curves(str(path), str(tmp_path / "c.png")) is None  # no row yet
    assert not (tmp_path / "c.png").exists()
    rows = ["1,4,7.5,7.2,7.3,,0.1,1,1", "2,8,6.5,nan,6.4,,0.1,1,1", "3,12,6.1,6.0,6.1,,0.1,1,1"]
    path.write_text("\n".join([header, *rows]) + "\n")  # a non-finite value is left out, not drawn
    series = {line.label: (line.xs, line.values) for line in curve_series(str(path))}
    assert series == {  # epoch 2's validation nan has no point; its other values do; no raw_val_bpd line
        "train (mean over the epoch)": ((1.0, 2.0, 3.0), (7.5, 6.5, 6.1)),
        "validation": ((1.0, 3.0), (7.2, 6.0)),
        "test": ((1.0, 2.0, 3.0), (7.3, 6.4, 6.1)),
    }
    drawn = []  # what reaches the picture: every line's (x, y) data
    original_plot = Axes.plot
    monkeypatch.setattr(
        Axes,
        "plot",
        lambda ax, xs, ys, *a, **k: drawn.append((tuple(xs), tuple(ys))) or original_plot(ax, xs, ys, *a, **k),
    )
    assert plot_curves(str(path), str(tmp_path / "c.png")) == str(tmp_path / "c.png")
    assert drawn == list(series.values()) and all(math.isfinite(v) for _, ys in drawn for v in ys)
    with Image.open(tmp_path / "c.png") as picture:
        picture.verify()
    assert _temporary_files(tmp_path) == []
