"""A training run's behaviour as a user meets it: a second run into a used folder, what a failed run
leaves, metrics.csv and steps.csv of interrupted and resumed runs, --max_steps beyond the epochs,
the cost said up front (and a run too big for memory refused), the training curve, and progress
bars in log files."""

import ast
import io
import math
import pathlib

import pytest
import torch
from PIL import Image

import glowflow.data as data_module
import glowflow.training.trainer as trainer_module
from glowflow.cli import main
from glowflow.config import GlowConfig, RunConfig
from glowflow.cost import RunCost, training_bytes_per_image
from glowflow.curves import STEP_COLUMNS, RunningLoss, curve_interval, plot_curves
from glowflow.errors import GlowflowError
from glowflow.progress import PlainProgress, progress_bar
from glowflow.runfolder import RunLock
from glowflow.training import Trainer
from tests.helpers import same_checkpoint_weights, write_smooth_npz

ARCH = ["--hidden_channels", "8", "--K", "2", "--L", "2", "--no_wandb"]
TINY = ["--batch_size", "16", *ARCH, "--warmup", "1", "--sample_and_save_freq", "0"]
# smooth.npz: 96 images, 77 of them train (9 validation, 10 test): 4 steps per epoch at batch 16, 9 at batch 8


@pytest.fixture(scope="module")
def smooth(tmp_path_factory):
    return write_smooth_npz(tmp_path_factory.mktemp("data") / "smooth.npz")


def _train(smooth, folder, *flags):
    return main(["--train", "--dataset", smooth, "--output_dir", str(folder), *TINY, *flags])


def _rows(path):
    return [line.split(",") for line in path.read_text().splitlines()[1:]]


# ----------------------------------------------------------------------------- a second run into the same folder


def test_a_second_run_into_a_used_folder_is_refused_unless_resume_or_overwrite(smooth, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert _train(smooth, run, "--max_steps", "4", "--sample_and_save_freq", "1") == 0
    kept = {name: (run / name).read_bytes() for name in ("last.pt", "metrics.csv", "samples_epoch001.png")}
    capsys.readouterr()

    def no_data(*args, **kwargs):
        raise AssertionError("the data was read before the refusal")

    with monkeypatch.context() as patch:  # refused before any work: the data is not even read
        patch.setattr(data_module, "load_dataset", no_data)
        assert _train(smooth, run, "--max_steps", "4") == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1, err
    assert "already holds a training run" in err and "--resume" in err and "--overwrite" in err
    assert {name: (run / name).read_bytes() for name in kept} == kept  # nothing touched

    assert _train(smooth, run, "--max_steps", "4", "--resume", "--overwrite") == 2
    assert "give one of them" in capsys.readouterr().err

    assert _train(smooth, run, "--max_steps", "2", "--overwrite") == 0  # a new run: the old files are gone
    assert "removed the previous run's" in capsys.readouterr().err
    assert not (run / "samples_epoch001.png").exists()
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 2
    assert [r[:2] for r in _rows(run / "metrics.csv")] == [["0", "2"]]

    assert _train(smooth, run, "--max_steps", "4", "--resume") == 0  # --resume continues it
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 4


def test_a_folder_with_only_a_failed_runs_header_is_not_a_previous_run(smooth, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("epoch,step,train_bpd,val_bpd,test_bpd,raw_val_bpd,lr,images_per_s,seconds\n")
    assert _train(smooth, run, "--max_steps", "1") == 0


# ----------------------------------------------------------------------------- what a failed run leaves


def _fail_at_evaluation(monkeypatch, epoch):
    """From now on, the evaluation after ``epoch`` epochs raises an error (the run fails)."""
    real = Trainer.evaluate

    def evaluate(self):
        if self.epoch + 1 >= epoch:
            raise RuntimeError("failing on purpose")
        return real(self)

    monkeypatch.setattr(Trainer, "evaluate", evaluate)


def test_a_run_that_fails_before_its_first_checkpoint_removes_the_folder_it_made(smooth, tmp_path, monkeypatch):
    run = tmp_path / "made" / "run"
    _fail_at_evaluation(monkeypatch, 1)
    with pytest.raises(RuntimeError, match="failing on purpose"):
        _train(smooth, run, "--n_epochs", "1")
    assert not run.exists() and (tmp_path / "made").is_dir()  # only the folder the run made


def test_a_run_that_fails_while_starting_removes_the_folder_it_made(smooth, tmp_path, monkeypatch, capsys):
    def initialize_actnorm(*args, **kwargs):
        raise GlowflowError("no initialisation today")

    monkeypatch.setattr(trainer_module, "initialize_actnorm", initialize_actnorm)
    run = tmp_path / "run"
    assert _train(smooth, run, "--n_epochs", "1") == 2
    assert "no initialisation today" in capsys.readouterr().err
    assert not run.exists()


def test_a_failed_run_in_a_users_folder_removes_only_its_own_files(smooth, tmp_path, monkeypatch):
    run = tmp_path / "mine"
    run.mkdir()
    (run / "notes.txt").write_text("the user's")
    _fail_at_evaluation(monkeypatch, 1)
    with pytest.raises(RuntimeError):
        _train(smooth, run, "--n_epochs", "1")
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]  # no lock, no metrics.csv, no steps.csv


def test_a_run_that_fails_after_a_checkpoint_keeps_everything(smooth, tmp_path, monkeypatch):
    run = tmp_path / "run"
    _fail_at_evaluation(monkeypatch, 2)
    with pytest.raises(RuntimeError):
        _train(smooth, run, "--n_epochs", "2")
    names = {p.name for p in run.iterdir()}
    assert {"last.pt", "Glow_smooth.pt", "metrics.csv", "steps.csv", "training_curves.png"} <= names
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1
    RunLock.acquire(str(run)).release()  # and the lock was released


# ----------------------------------------------------------------------------- metrics.csv and steps.csv on resume


@pytest.fixture(scope="module")
def uninterrupted(smooth, tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    assert _train(smooth, folder, "--n_epochs", "2", "--batch_size", "8") == 0
    return folder


def _interrupt_before_step(monkeypatch, step):
    """Ctrl-C between steps: before optimizer step ``step`` (counted from 1) is taken."""
    real = Trainer.train_step

    def train_step(self, images, labels):
        if self.step + 1 == step:
            raise KeyboardInterrupt
        return real(self, images, labels)

    monkeypatch.setattr(Trainer, "train_step", train_step)


@pytest.mark.parametrize("stop", ["interrupt", "max_steps"])
def test_an_interrupted_and_resumed_run_records_what_an_uninterrupted_run_records(
    smooth, uninterrupted, tmp_path, monkeypatch, stop
):
    run = tmp_path / "run"
    argv = ["--n_epochs", "2", "--batch_size", "8"]  # 9 steps per epoch: a steps.csv row every step
    if stop == "interrupt":
        with monkeypatch.context() as patch:
            _interrupt_before_step(patch, 8)  # in epoch 1, after 7 of its 9 steps
            assert _train(smooth, run, *argv) == 130
        assert torch.load(run / "last.pt", weights_only=True)["step"] == 7
    else:
        assert _train(smooth, run, *argv, "--max_steps", "13") == 0  # in epoch 2, with a row of its own
        assert [r[:2] for r in _rows(run / "metrics.csv")] == [["1", "9"], ["1", "13"]]
    assert _train(smooth, run, *argv, "--resume") == 0

    assert same_checkpoint_weights(run / "last.pt", uninterrupted / "last.pt")
    rows, expected = _rows(run / "metrics.csv"), _rows(uninterrupted / "metrics.csv")
    assert len(expected) == 2 and [r[:7] for r in rows] == [r[:7] for r in expected]  # train_bpd included
    # the epochs' seconds add up the steps of both runs: a positive time, not the resumed part's alone
    assert all(float(r[8]) > 0 for r in rows)
    assert (run / "steps.csv").read_text() == (uninterrupted / "steps.csv").read_text()


def test_a_checkpoint_without_running_sums_resumes_and_a_malformed_one_is_refused(tmp_path):
    assert RunningLoss.from_checkpoint(None, "x.pt") == RunningLoss()
    good = RunningLoss(1.5, 2, 16, 0.1, 0.5, 1).to_dict()
    assert RunningLoss.from_checkpoint(good, "x.pt") == RunningLoss(1.5, 2, 16, 0.1, 0.5, 1)
    for bad in ({**good, "epoch_sum": math.nan}, {**good, "epoch_steps": -1}, {**good, "point_steps": 1.5}, [1]):
        with pytest.raises(GlowflowError, match="running_loss"):
            RunningLoss.from_checkpoint(bad, "x.pt")


# ----------------------------------------------------------------------------- --max_steps and the epochs


def test_epochs_that_end_before_max_steps_say_so(smooth, tmp_path, capsys):
    assert _train(smooth, tmp_path / "a", "--n_epochs", "1", "--max_steps", "10") == 0
    out, err = capsys.readouterr()
    notes = [line for line in err.splitlines() if "--max_steps" in line]
    assert notes == [
        "note: 1 epoch(s) of 4 step(s) end the run at step 4, before --max_steps 10 (raise --n_epochs to train longer)"
    ]
    assert "4 step(s) to go (1 epoch(s))" in out

    assert _train(smooth, tmp_path / "b", "--n_epochs", "3", "--max_steps", "2") == 0
    out, err = capsys.readouterr()
    assert "2 step(s) to go (--max_steps 2 ends it before epoch 3)" in out and "--max_steps" not in err


# ----------------------------------------------------------------------------- the cost, up front


def _saved_floats_per_image(config, grad_checkpoint=False):
    """Floats of activations autograd keeps for the backward pass, per image: the growth from 2 to 6
    images (so that tensors made from the weights alone do not count)."""
    from glowflow import Glow

    torch.manual_seed(0)
    model = Glow.from_config(config)
    with torch.no_grad():
        model.initialize(torch.rand(8, *config.image_shape) - 0.5)
    model.train()
    sizes = []
    for n in (2, 6):
        seen = {}

        def pack(tensor, seen=seen):
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(torch.rand(n, *config.image_shape) - 0.5, None)[0].mean().backward()
        sizes.append(sum(seen.values()))
    return (sizes[1] - sizes[0]) / 4 / 4


@pytest.mark.parametrize(
    "shape, hidden, K, L, coupling",
    [((1, 32, 32), 32, 2, 2, "affine"), ((3, 16, 16), 64, 2, 2, "affine"), ((1, 32, 32), 16, 2, 3, "additive")],
)
def test_the_activation_estimate_is_near_what_autograd_keeps(shape, hidden, K, L, coupling):
    config = GlowConfig(image_shape=shape, hidden_channels=hidden, K=K, L=L, flow_coupling=coupling)
    measured = _saved_floats_per_image(config)
    estimated = training_bytes_per_image(config) / 4
    assert 0.8 * measured <= estimated <= 2.0 * measured, (estimated, measured)
    assert training_bytes_per_image(config, grad_checkpoint=True) < training_bytes_per_image(config)
    deep = GlowConfig(image_shape=shape, hidden_channels=hidden, K=16, L=L, flow_coupling=coupling)
    assert training_bytes_per_image(deep, grad_checkpoint=True) < training_bytes_per_image(deep) / 4


def test_a_huge_image_shape_is_costed_at_once_and_refused_when_it_cannot_fit(monkeypatch):
    import time

    config = GlowConfig(image_shape=(1, 4096, 4096), K=8, L=3, hidden_channels=64)  # within the limits
    monkeypatch.setattr("glowflow.cost.available_memory", lambda device: 64 * 2**30)
    started = time.perf_counter()
    cost = RunCost.estimate(config, 10**6, 1000, 8, RunConfig(), 0, 128, 512, torch.device("cpu"))
    assert time.perf_counter() - started < 0.5  # from the configuration alone
    assert not cost.fits()
    with pytest.raises(GlowflowError) as refused:
        cost.check_memory()
    message = str(refused.value)
    assert "\n" not in message and "more than the 68.7 GB free on cpu" in message and "--batch_size" in message
    assert "TB" in cost.describe()  # terabytes per batch of 128, said in the cost line


def test_a_run_too_big_for_memory_is_refused_before_any_work(smooth, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("glowflow.cost.available_memory", lambda device: 10**6)  # 1 MB free
    run = tmp_path / "run"
    assert _train(smooth, run, "--n_epochs", "1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("glowflow: error: this run would need about") and "1 MB free on cpu" in err[-1]
    assert not run.exists()


# ----------------------------------------------------------------------------- the training curve


def test_steps_csv_has_points_every_few_steps_and_the_figure_draws_them(smooth, tmp_path):
    assert curve_interval(4) == 1 and curve_interval(422) == 22 and curve_interval(20_000) == 1000
    run = tmp_path / "run"
    assert _train(smooth, run, "--n_epochs", "2") == 0
    lines = (run / "steps.csv").read_text().splitlines()
    assert lines[0] == ",".join(STEP_COLUMNS)
    rows = [line.split(",") for line in lines[1:]]
    assert [int(r[0]) for r in rows] == list(range(1, 9)) and [float(r[1]) for r in rows[3::4]] == [1.0, 2.0]
    # an epoch's train_bpd is the mean of its steps, each point the mean of the steps since the last
    for epoch, row in enumerate(_rows(run / "metrics.csv")):
        points = [float(r[2]) for r in rows[4 * epoch : 4 * epoch + 4]]
        assert float(row[2]) == pytest.approx(sum(points) / 4, abs=1e-5)
    with Image.open(run / "training_curves.png") as picture:
        picture.verify()

    metrics, steps = tmp_path / "metrics.csv", tmp_path / "steps.csv"
    metrics.write_text((run / "metrics.csv").read_text())
    steps.write_text(",".join(STEP_COLUMNS) + "\n")  # an empty step curve: the epochs' means are drawn
    assert plot_curves(str(metrics), str(tmp_path / "c.png"), str(steps), 4) == str(tmp_path / "c.png")
    metrics.write_text(metrics.read_text().splitlines()[0] + "\n")
    assert plot_curves(str(metrics), str(tmp_path / "d.png"), str(steps), 4) is None  # nothing to draw


# ----------------------------------------------------------------------------- progress bars


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_in_a_log_file_is_a_plain_line_every_so_often():
    stream, clock = io.StringIO(), FakeClock()
    bar = PlainProgress(total=100, desc="epoch 1/3", unit="step", stream=stream, interval=30.0, clock=clock)
    for _ in range(100):
        clock.now += 1.0  # a step a second: a line every 30 steps
        bar.update(1)
        bar.set_postfix(bpd="3.210")
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) == 3
    assert lines[0] == "epoch 1/3: 30% (30/100) 1 step/s, 30s elapsed, about 1m10s left, bpd=3.210"

    stream = io.StringIO()
    for _ in PlainProgress(range(1000), desc="quick", stream=stream):  # done within the interval: silent
        pass
    assert stream.getvalue() == ""


def test_the_progress_bar_is_tqdm_on_a_terminal_only(monkeypatch):
    from tqdm import tqdm

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stderr", Terminal())
    bar = progress_bar(range(3), desc="x")
    assert isinstance(bar, tqdm)
    bar.close()
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert isinstance(progress_bar(range(3), desc="x"), PlainProgress)


def test_every_progress_bar_of_glowflow_goes_through_the_helper():
    package = pathlib.Path(__file__).resolve().parents[2] / "glowflow"
    users = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                if any(name.split(".")[0] == "tqdm" for name in names):
                    users.add(path.name)
    assert users == {"progress.py"}


def test_a_training_run_logged_to_a_file_has_no_carriage_returns(smooth, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("glowflow.progress.PLAIN_LINE_SECONDS", 0.0)  # a line at every update
    assert _train(smooth, tmp_path / "run", "--n_epochs", "1") == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    assert "epoch 1/1: 100% (4/4)" in err and "bpd=" in err
