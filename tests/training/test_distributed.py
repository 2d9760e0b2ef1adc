"""torchrun + DistributedDataParallel on CPU (gloo): 2 processes with batch B/2 each reproduce
one process with batch B."""

import os
import subprocess
import sys

import torch

from tests.helpers import TINY_CLI_RUN, write_smooth_npz

FLAGS = [
    *TINY_CLI_RUN,
    "--num_classes",
    "3",
    "--val_size",  # 78 training images: ActNorm's initialisation splits them evenly between 2 processes
    "8",
]


def _train(argv, nproc=None, timeout=600):
    env = dict(os.environ)
    if nproc is None:
        cmd = [sys.executable, "-m", "glowflow", *argv]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "glowflow",
            *argv,
        ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_process_ddp_matches_one_process(tmp_path):
    data = write_smooth_npz(tmp_path / "smooth.npz")
    # the first run fits its priors (the default), the second has the paper's priors: with a fit the
    # evaluated bits/dim move with the dequantisation noise each process draws for its share of the
    # evaluation images, which differs from one process's (a tiny fit is sensitive to it)
    for i, extra in enumerate(([], ["--y_condition", "--ema", "0.9", "--augment", "--prior_fit", "none"])):
        single, ddp = tmp_path / f"single{i}", tmp_path / f"ddp{i}"
        _train(["--train", "--dataset", data, "--output_dir", str(single), *FLAGS, *extra])
        proc = _train(["--train", "--dataset", data, "--output_dir", str(ddp), *FLAGS, *extra], nproc=2)
        assert "2 process(es)" in proc.stdout
        # only rank 0 logs and writes: one summary line per epoch, one metrics row per epoch
        assert proc.stdout.count("epoch 2/2") == 1
        assert len((ddp / "metrics.csv").read_text().strip().splitlines()) == 3
        a = torch.load(single / "last.pt", weights_only=True)
        b = torch.load(ddp / "last.pt", weights_only=True)
        assert a["step"] == b["step"] == 8  # 78 of the 96 images train (8 validation, 10 test)
        worst = max((a["model"][k].double() - b["model"][k].double()).abs().max().item() for k in a["model"])
        # same data, same noise, same init; only the order of floating-point sums differs
        assert worst < 1e-4, worst
        single_rows = (single / "metrics.csv").read_text().splitlines()[1:]
        ddp_rows = (ddp / "metrics.csv").read_text().splitlines()[1:]
        for r1, r2 in zip(single_rows, ddp_rows):
            for column in (2, 3, 4) if i else (2,):  # training (over both processes), validation, test bits/dim
                assert abs(float(r1.split(",")[column]) - float(r2.split(",")[column])) < 1e-3

    # resume under torchrun continues the run
    _train(["--train", "--dataset", data, "--output_dir", str(ddp), *FLAGS, "--n_epochs", "3", "--resume"], nproc=2)
    assert torch.load(ddp / "last.pt", weights_only=True)["step"] == 12
