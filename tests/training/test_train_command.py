"""Training through the command line (``glowflow --train``): interruption, non-finite steps, tracking
(wandb, TensorBoard), bf16 autocast, torch.compile, and the files a run writes."""

import os
import signal
import subprocess
import sys

import pytest
import torch

from glowflow.cli import main
from tests.helpers import TINY_CLI_RUN, checkpoint_weights, interrupt_training, write_smooth_npz

TINY = TINY_CLI_RUN


def test_training_on_a_dataset_with_a_255_character_name(tmp_path, capsys):
    data = write_smooth_npz(tmp_path / ("d" * 251 + ".npz"), n=32)
    run = tmp_path / "run"
    argv = ["--train", "--dataset", data, "--output_dir", str(run), *TINY[2:], "--n_epochs", "1"]
    assert main([*argv, "--sample_and_save_freq", "0"]) == 0
    (best,) = [p for p in os.listdir(run) if p.startswith("Glow_")]
    assert len(best) <= len("Glow_.pt") + 80 and best.startswith("Glow_ddd")
    argv = [
        "--outlier_detection",
        "--checkpoint",
        str(run / best),
        "--out_dataset",
        "constant",
        "--output_dir",
        str(run),
    ]
    assert main(argv) == 0, capsys.readouterr().err
    assert any(p.startswith("ood_ddd") and p.endswith("_vs_constant.json") for p in os.listdir(run))


def test_wandb_falls_back_to_offline_without_network_or_login(tiny, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    env["HOME"] = str(tmp_path)  # no ~/.netrc: not logged in
    run = tmp_path / "wb"
    argv = [a for a in TINY if a != "--no_wandb"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "glowflow",
            "--train",
            "--dataset",
            tiny["in"],
            "--output_dir",
            str(run),
            "--max_steps",
            "2",
            *argv,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "wandb is not logged in; logging offline" in proc.stderr
    assert (run / "last.pt").exists()
    assert any(p.name.startswith("offline-run") for p in (run / "wandb").iterdir())


def test_ctrl_c_saves_last_checkpoint(tiny, tmp_path):
    run = tmp_path / "interrupted"
    returncode, err = interrupt_training(run, ["--dataset", tiny["in"], "--n_epochs", "1000", *TINY[2:]], signal.SIGINT)
    assert returncode == 130, err[-2000:]
    assert "interrupted at step" in err and "--resume" in err
    payload = torch.load(run / "last.pt", weights_only=True)
    assert payload["step"] >= 4  # a whole epoch: 77 of smooth's 96 images train (10 test, 9 validation)


def _alter_log_prob_on_second_call(monkeypatch, alter):
    """From now on, Glow.forward returns ``alter(log_prob)`` on its second call only."""
    from glowflow.model import Glow

    real_forward = Glow.forward
    calls = {"n": 0}

    def forward(self, x, y=None):
        calls["n"] += 1
        log_prob, logits = real_forward(self, x, y)
        return (alter(log_prob) if calls["n"] == 2 else log_prob), logits

    monkeypatch.setattr(Glow, "forward", forward)


def test_non_finite_losses_are_skipped_then_stop_the_run(tiny, tmp_path, capsys, monkeypatch):
    from glowflow.model import Glow

    run = tmp_path / "nan"
    real_forward = Glow.forward
    _alter_log_prob_on_second_call(monkeypatch, lambda log_prob: log_prob * float("nan"))
    flags = [*TINY[2:], "--batch_size", "8"]  # 9 steps per epoch: room for 5 skipped ones in a row
    assert main(["--train", "--dataset", tiny["in"], "--output_dir", str(run), *flags, "--n_epochs", "1"]) == 0
    payload = torch.load(run / "last.pt", weights_only=True)
    assert payload["nonfinite_steps"] == 1 and payload["step"] == 9 and payload["epoch"] == 1
    assert "1 step(s) skipped" in capsys.readouterr().err

    monkeypatch.setattr(Glow, "forward", lambda self, x, y=None: (real_forward(self, x, y)[0] * float("nan"), None))
    before = (run / "last.pt").read_bytes()
    code = main(["--train", "--dataset", tiny["in"], "--output_dir", str(run), *flags, "--n_epochs", "2", "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "5 non-finite losses or gradients in a row" in err and "last good checkpoint" in err
    assert (run / "last.pt").read_bytes() == before  # the last good checkpoint is kept


def test_a_finite_loss_with_non_finite_gradients_is_skipped(tiny, tmp_path, monkeypatch):
    class InfiniteGradient(torch.autograd.Function):
        """Identity forward; the backward pass overflows to inf."""

        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * float("inf")

    run = tmp_path / "infgrad"
    _alter_log_prob_on_second_call(monkeypatch, InfiniteGradient.apply)
    assert (
        main(
            [
                "--train",
                "--dataset",
                tiny["in"],
                "--output_dir",
                str(run),
                *TINY[2:],
                "--n_epochs",
                "1",
                "--sample_and_save_freq",
                "0",
            ]
        )
        == 0
    )
    payload = torch.load(run / "last.pt", weights_only=True)
    assert payload["nonfinite_steps"] == 1 and payload["step"] == 4
    assert all(torch.isfinite(v).all() for v in payload["model"].values() if v.is_floating_point())


def test_max_abs_without_get_total_norm(monkeypatch):
    from glowflow.training import max_abs

    tensors = [torch.tensor([1.0, -3.0]), torch.tensor([[2.0]]), torch.tensor([3e38, -3e38])]
    assert max_abs(tensors).item() == pytest.approx(3e38)
    monkeypatch.delattr(torch.nn.utils, "get_total_norm", raising=False)  # torch < 2.6
    assert max_abs(tensors).item() == pytest.approx(3e38)
    assert torch.isinf(max_abs([*tensors, torch.tensor([-float("inf")])]))
    assert torch.isnan(max_abs([*tensors, torch.tensor([float("nan"), 0.0])]))


def test_tensorboard_logs(tiny, tmp_path):
    run = tmp_path / "tb"
    assert (
        main(
            [
                "--train",
                "--dataset",
                tiny["in"],
                "--output_dir",
                str(run),
                *TINY[2:],
                "--n_epochs",
                "1",
                "--tensorboard",
                "--sample_and_save_freq",
                "0",
            ]
        )
        == 0
    )
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())


def test_bf16_autocast_training_runs_on_cpu(tiny, tmp_path):
    run = tmp_path / "amp"
    assert (
        main(
            [
                "--train",
                "--dataset",
                tiny["in"],
                "--output_dir",
                str(run),
                *TINY[2:],
                "--n_epochs",
                "1",
                "--amp",
                "bf16",
                "--sample_and_save_freq",
                "0",
            ]
        )
        == 0
    )
    payload = torch.load(run / "last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in payload["model"].values() if v.is_floating_point())
    assert all(v.dtype != torch.bfloat16 for v in payload["model"].values())  # weights stay float32


def test_compiled_training_matches_eager_training(tiny, tmp_path):
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    common = [
        "--train",
        "--dataset",
        tiny["in"],
        *TINY[2:],
        "--n_epochs",
        "1",
        "--max_steps",
        "2",
        "--sample_and_save_freq",
        "0",
        "--K",
        "1",
        "--L",
        "1",
    ]  # a small graph: compiling is slow
    assert main([*common, "--output_dir", str(eager)]) == 0
    assert main([*common, "--output_dir", str(compiled), "--compile"]) == 0
    a, b = checkpoint_weights(eager / "last.pt"), checkpoint_weights(compiled / "last.pt")
    assert a.keys() == b.keys()
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) < 1e-4
