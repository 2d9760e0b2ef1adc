"""Training never loses work and never reports a wrong result with exit 0."""

import numpy as np
import pytest
import torch

from glowflow.cli import main
from tests.helpers import write_smooth_npz

ARCH = ["--hidden_channels", "8", "--K", "2", "--L", "2", "--no_wandb"]
TINY = ["--batch_size", "16", *ARCH, "--warmup", "1"]


@pytest.fixture(scope="module")
def smooth(tmp_path_factory):
    return write_smooth_npz(tmp_path_factory.mktemp("data") / "smooth.npz")


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
