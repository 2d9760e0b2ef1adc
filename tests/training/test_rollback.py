"""Training that survives a bad step (glowflow/training/rollback.py): a non-finite batch, a learning
rate ten times too high and non-finite weights are rolled back and the run ends finite; the
rollback is printed and recorded; a run stopped after a rollback resumes exactly; --max_rollbacks
bounds them, and 0 is the old behaviour."""

import math

import pytest
import torch

import glowflow.training.rollback as rollback_module
import glowflow.training.step as step_module
from glowflow.cli import main
from glowflow.tracking import EVENT_COLUMN, METRIC_COLUMNS, drop_rows_after
from glowflow.training import Trainer
from tests.helpers import write_smooth_npz

ARCH = ["--hidden_channels", "8", "--K", "2", "--L", "2", "--no_wandb", "--warmup", "1", "--sample_and_save_freq", "0"]
# smooth.npz: 77 training images: 4 steps per epoch at batch 16, 9 at batch 8


@pytest.fixture(scope="module")
def smooth(tmp_path_factory):
    return write_smooth_npz(tmp_path_factory.mktemp("data") / "smooth.npz")


def _train(smooth, folder, *flags, batch=16):
    argv = ["--train", "--dataset", smooth, "--output_dir", str(folder), *ARCH, "--batch_size", str(batch)]
    return main([*argv, *flags])


def _nan_batches(monkeypatch, *steps):
    """The batches of these steps (counted from 1) reach the model as NaN."""
    real = step_module.model_inputs

    def model_inputs(images, labels, model, run, step, *rest):
        x, y = real(images, labels, model, run, step, *rest)
        return (x * float("nan") if step + 1 in steps else x), y

    monkeypatch.setattr(step_module, "model_inputs", model_inputs)


def _stop_before_step(monkeypatch, step):
    """Ctrl-C before step ``step`` (counted from 1): last.pt is saved after step - 1 steps."""
    real = Trainer.train_step

    def train_step(self, images, labels):
        if self.step + 1 == step:
            raise KeyboardInterrupt
        return real(self, images, labels)

    monkeypatch.setattr(Trainer, "train_step", train_step)


def _payload(folder, name="last.pt"):
    return torch.load(folder / name, weights_only=True)


def _finite(weights):
    return all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def _metrics(folder):
    header, *rows = (folder / "metrics.csv").read_text().splitlines()
    return header.split(","), [row.split(",", 9) for row in rows]


def _rollback_rows(folder):
    return [row for row in _metrics(folder)[1] if len(row) == 10 and row[9]]


# ----------------------------------------------------------------------------- a bad batch, a bad learning rate


@pytest.mark.parametrize("ema", ["0", "0.999"])
def test_a_non_finite_batch_is_rolled_back_and_the_run_ends_finite(smooth, tmp_path, capsys, monkeypatch, ema):
    _nan_batches(monkeypatch, 6)
    run = tmp_path / "run"
    assert _train(smooth, run, "--n_epochs", "3", "--ema", ema) == 0
    err = capsys.readouterr().err
    line = "note: step 6: non-finite loss; restored the state of step 4, learning rate x0.5 for 100 steps "
    line += "(rollback 1 of 5)"
    assert err.count("note: step") == 1 and line in err.splitlines(), err
    assert "1 step(s) skipped so far for a non-finite loss or gradient, 1 rollback(s)" in err

    payload = _payload(run)
    assert payload["nonfinite_steps"] == 1 and payload["step"] == 12
    assert payload["rollback"] == dict(rollbacks=1, lr_cuts=1, cooldown_until=106, kept_step=12)  # kept at the end
    assert _finite(payload["model"]) and _finite(payload.get("raw_model", payload["model"]))
    header, rows = _metrics(run)
    assert header == [*METRIC_COLUMNS, EVENT_COLUMN]
    assert [row[:2] for row in rows] == [["1", "4"], ["1", "6"], ["2", "8"], ["3", "12"]]
    assert rows[1][2:6] == ["", "", "", ""] and rows[1][9] == '"' + line[len("note: ") :] + '"'
    assert all(math.isfinite(float(row[4])) for row in rows if len(row) == 9)  # every test bits/dim
    assert float(rows[1][6]) == pytest.approx(1e-4) and float(rows[3][6]) == pytest.approx(1e-4)  # 2e-4 x0.5


def test_a_rollback_puts_back_exactly_the_kept_state(smooth, tmp_path, monkeypatch):
    """A rollback at step 5 puts back the state of step 4 (the end of epoch 1): weights, average,
    optimizer and scheduler, exactly as the epoch's last.pt holds them."""
    first = tmp_path / "first"
    assert _train(smooth, first, "--n_epochs", "1", "--ema", "0.99") == 0
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        _nan_batches(patch, 5)
        _stop_before_step(patch, 6)
        assert _train(smooth, run, "--n_epochs", "2", "--ema", "0.99") == 130
    kept, rolled = _payload(first), _payload(run)
    assert rolled["step"] == 5 and rolled["rollback"]["kept_step"] == 4 and "state" not in rolled["rollback"]
    for key in ("model", "raw_model"):
        assert all(torch.equal(kept[key][k], rolled[key][k]) for k in kept[key]), key
    for index, state in kept["optimizer"]["state"].items():
        assert all(torch.equal(v, rolled["optimizer"]["state"][index][k]) for k, v in state.items())
    assert rolled["scheduler"]["last_epoch"] == kept["scheduler"]["last_epoch"] == 4


def test_a_learning_rate_ten_times_too_high_ends_finite_with_rollbacks(smooth, tmp_path, capsys):
    flags = ["--n_epochs", "5"]
    assert _train(smooth, tmp_path / "good", *flags, "--lr", "0.03") == 0  # a learning rate that trains
    good = _payload(tmp_path / "good")
    assert "rollback" in good and good["rollback"]["rollbacks"] == 0

    code = _train(smooth, tmp_path / "off", *flags, "--lr", "0.3", "--max_rollbacks", "0")  # ten times that
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "training diverged" in err, err

    run = tmp_path / "on"
    assert _train(smooth, run, *flags, "--lr", "0.3") == 0
    out, err = capsys.readouterr()
    payload = _payload(run)
    assert payload["rollback"]["rollbacks"] >= 1 and "rollback 1 of 5" in err
    assert _finite(payload["model"])
    test_bpd = float(out.split("done: best validation bits/dim ")[1].split("(test ")[1].split(")")[0])
    assert math.isfinite(test_bpd) and all(math.isfinite(float(r[4])) for r in _metrics(run)[1] if len(r) == 9)


def test_non_finite_weights_are_rolled_back_at_the_next_step_and_at_the_end_of_an_epoch(
    smooth, tmp_path, capsys, monkeypatch
):
    real = Trainer.train_step

    def train_step(self, images, labels):
        bpd = real(self, images, labels)
        if self.step + 1 in (2, 4):  # the update of step 2, and of step 4, the epoch's last, leave a NaN
            with torch.no_grad():
                next(self.model.parameters()).view(-1)[0] = float("nan")
        return bpd

    monkeypatch.setattr(Trainer, "train_step", train_step)
    run = tmp_path / "run"
    assert _train(smooth, run, "--n_epochs", "2") == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: step")]
    assert notes == [
        "note: step 3: non-finite weights; restored the state of step 0, learning rate x0.5 for 100 steps "
        "(rollback 1 of 5)",
        "note: step 4: non-finite weights; restored the state of step 0, learning rate x0.25 for 100 steps "
        "(rollback 2 of 5)",
    ]
    payload = _payload(run)
    assert payload["nonfinite_steps"] == 1 and payload["rollback"]["rollbacks"] == 2 and _finite(payload["model"])


# ----------------------------------------------------------------------------- resuming after a rollback


@pytest.mark.parametrize("keep_every", [3, 50])
@pytest.mark.parametrize("stop", ["interrupt", "max_steps"])
def test_a_run_stopped_after_a_rollback_resumes_exactly(smooth, tmp_path, monkeypatch, stop, keep_every):
    """Bad batches at steps 3 and 8 of two 9-step epochs; the run stops after step 5, between
    them, when the kept state is not the saved one (so last.pt carries it too)."""
    monkeypatch.setattr(rollback_module, "KEEP_EVERY", keep_every)
    _nan_batches(monkeypatch, 3, 8)
    flags = ["--n_epochs", "2"]
    whole = tmp_path / "whole"
    assert _train(smooth, whole, *flags, batch=8) == 0
    assert _payload(whole)["rollback"]["rollbacks"] == 2

    run = tmp_path / "run"
    if stop == "interrupt":
        with monkeypatch.context() as patch:
            _stop_before_step(patch, 6)
            assert _train(smooth, run, *flags, batch=8) == 130
    else:
        assert _train(smooth, run, *flags, "--max_steps", "5", batch=8) == 0
    stopped = _payload(run)
    assert stopped["step"] == 5 and stopped["rollback"]["rollbacks"] == 1 and "state" in stopped["rollback"]
    assert _train(smooth, run, *flags, "--resume", batch=8) == 0

    resumed, expected = _payload(run), _payload(whole)
    for key in ("model", "optimizer", "rollback", "nonfinite_steps", "step"):
        assert _same(resumed[key], expected[key]), key
    cells = lambda folder: [row[:7] + row[9:] for row in _metrics(folder)[1]]  # noqa: E731 (all but timings)
    assert cells(run) == cells(whole) and len(_rollback_rows(whole)) == 2
    assert (run / "steps.csv").read_text() == (whole / "steps.csv").read_text()


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_a_malformed_rollback_state_is_refused_in_one_line(smooth, tmp_path, capsys, monkeypatch):
    _nan_batches(monkeypatch, 2)
    run = tmp_path / "run"
    assert _train(smooth, run, "--n_epochs", "2", "--max_steps", "3") == 0
    good = _payload(run)
    assert good["rollback"]["state"]["step"] == 0
    nan_weights = {k: v * float("nan") if v.is_floating_point() else v for k, v in good["model"].items()}
    for broken, message in [
        ({**good["rollback"], "rollbacks": -1}, "rollback rollbacks must be an integer"),
        ({**good["rollback"], "kept_step": 9}, "beyond the checkpoint's step 3"),
        ({**good["rollback"], "state": {**good["rollback"]["state"], "model": nan_weights}}, "holds non-finite"),
        ({**good["rollback"], "state": {**good["rollback"]["state"], "step": 1}}, "not kept_step 0"),
    ]:
        torch.save({**good, "rollback": broken}, run / "broken.pt")
        capsys.readouterr()
        assert _train(smooth, tmp_path / "resumed", "--resume", str(run / "broken.pt")) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not (tmp_path / "resumed").exists()


# ----------------------------------------------------------------------------- bounds, and rollbacks off


def test_after_max_rollbacks_the_next_bad_step_stops_the_run(smooth, tmp_path, capsys, monkeypatch):
    _nan_batches(monkeypatch, 3, 6)
    run = tmp_path / "run"
    code = _train(smooth, run, "--n_epochs", "3", "--max_rollbacks", "1")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "rollback 1 of 1" in "\n".join(err)
    assert err[-1].startswith("glowflow: error: non-finite loss at step 6 after 1 rollback(s) (--max_rollbacks 1)")
    assert "training diverged" in err[-1] and f"the last good checkpoint is kept in {run} (last.pt)" in err[-1]
    assert _payload(run)["step"] == 4 and _finite(_payload(run)["model"])


def test_max_rollbacks_0_only_skips_and_rollbacks_change_nothing_without_a_bad_step(
    smooth, tmp_path, capsys, monkeypatch
):
    assert _train(smooth, tmp_path / "on", "--n_epochs", "2") == 0
    assert _train(smooth, tmp_path / "off", "--n_epochs", "2", "--max_rollbacks", "0") == 0
    on, off = _payload(tmp_path / "on"), _payload(tmp_path / "off")
    assert _same(on["model"], off["model"]) and _same(on["optimizer"], off["optimizer"])
    assert "rollback" not in off and _metrics(tmp_path / "on")[0] == list(METRIC_COLUMNS)  # no event, no column

    _nan_batches(monkeypatch, 3)
    capsys.readouterr()
    run = tmp_path / "skip"
    assert _train(smooth, run, "--n_epochs", "1", "--max_rollbacks", "0") == 0
    err = capsys.readouterr().err
    assert "note: step" not in err and "1 step(s) skipped so far for a non-finite loss or gradient\n" in err
    assert _metrics(run)[0] == list(METRIC_COLUMNS) and _payload(run)["nonfinite_steps"] == 1


def test_resume_keeps_rollback_rows_and_drops_them_beyond_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.csv"
    header = ",".join([*METRIC_COLUMNS, EVENT_COLUMN])
    event = "0,3,,,,,0.1,,,step 3: non-finite loss; restored the state of step 0"
    lines = [header, event, "0,5,7,7,7,,0.1,1,1", "1,9,7,7,7,,0.1,1,1", "1,11,,,,,0.1,,,step 11: rollback"]
    path.write_text("\r\n".join(lines) + "\r\n")
    assert drop_rows_after(str(path), 0, 5, partial=True) == 3  # the partial epoch's row, and what came after
    assert path.read_text().splitlines() == lines[:2]
    path.write_text("\r\n".join([lines[0], "0,5,,,,,0.1,,,step 5: rollback"]) + "\r\n")
    assert drop_rows_after(str(path), 0, 5, partial=True) == 0  # an event at the checkpoint's step stays
