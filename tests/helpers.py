"""Shared test utilities: every architecture combination, randomised float64 models, the tiny data sets
and run flags of the command-line tests, and interrupting a training run."""

import itertools
import subprocess
import sys
import time

import torch

from glowflow import Glow, GlowConfig
from glowflow.layers import ActNorm


def architecture_combinations():
    """Every flag combination the tests must cover: permutation x coupling x LU (invconv only)
    x learn_top x y_condition."""
    for perm, coupling, learn_top, y_condition in itertools.product(
        ("invconv", "shuffle", "reverse"), ("additive", "affine"), (False, True), (False, True)
    ):
        for lu in (False, True) if perm == "invconv" else (False,):
            yield dict(
                flow_permutation=perm,
                flow_coupling=coupling,
                LU_decomposed=lu,
                learn_top=learn_top,
                y_condition=y_condition,
            )


def combo_id(combo):
    return "-".join(f"{k}={v}" for k, v in combo.items())


def randomised_model(image_shape, L, combo, K=2, hidden=8, dtype=torch.float64, seed=0, scale=0.1):
    """A small model with every parameter moved away from its (often identity or zero) initial
    value, so that no layer is trivially exact: weights are perturbed, ActNorm is initialised from a
    random batch through the perturbed network (keeping activations of order one), then ActNorm's
    own parameters are perturbed too."""
    torch.manual_seed(seed)
    config = GlowConfig(image_shape=image_shape, hidden_channels=hidden, K=K, L=L, num_classes=3, **combo)
    model = Glow(config).to(dtype)
    actnorm_params = {id(p) for m in model.modules() if isinstance(m, ActNorm) for p in m.parameters()}
    with torch.no_grad():
        for p in model.parameters():
            if id(p) not in actnorm_params:
                p.add_(scale * torch.randn_like(p))
        model.initialize(torch.rand(16, *image_shape, dtype=dtype) - 0.5)
        for p in model.parameters():
            if id(p) in actnorm_params:
                p.add_(scale * torch.randn_like(p))
    return model.eval()


def importance_sampling_integral(model, shape):
    """(estimate, standard error) of the integral of the model's density over model space,
    E_q[p(x) / q(x)] with a proposal q of independent heavy-tailed Student-t (df 2) placed where the
    model puts its mass (located and scaled from 20000 model samples; q's own density is exact
    whatever the fit), from 400000 draws."""
    with torch.no_grad():
        located = model.sample(20_000).flatten(1)
    proposal = torch.distributions.Independent(
        torch.distributions.StudentT(2.0, located.median(0).values, 1.5 * located.std(0)), 1
    )
    x = proposal.sample((400_000,))
    with torch.no_grad():
        log_p = torch.cat([model.log_prob(chunk.view(-1, *shape)) for chunk in x.split(50_000)])
    weights = torch.exp(log_p - proposal.log_prob(x))
    return weights.mean().item(), weights.std().item() / len(weights) ** 0.5


def labels_for(model, n):
    return torch.arange(n) % model.config.num_classes if model.config.y_condition else None


def write_smooth_npz(path, n=96, size=16, channels=1, seed=0, num_classes=3):
    """A small .npz dataset (the user-data format: uint8 `images`, int `labels`) of smooth
    sinusoidal gradients: easy for a tiny Glow to model, unlike noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    images = []
    for _ in range(n):
        planes = []
        for _ in range(channels):
            a, b = rng.uniform(-1, 1, 2)
            planes.append(0.5 + 0.4 * np.sin(3 * (a * xx + b * yy) + rng.uniform(0, 6)))
        image = np.stack(planes, -1) if channels > 1 else planes[0]
        images.append((image * 255).astype(np.uint8))
    np.savez(path, images=np.stack(images), labels=rng.integers(0, num_classes, n))
    return str(path)


def write_noise_npz(path, n=64, size=16, channels=1, seed=1):
    """Uniform-noise images in the .npz user-data format (an easy outlier set)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    shape = (n, size, size, channels) if channels > 1 else (n, size, size)
    np.savez(path, images=rng.integers(0, 256, shape, dtype=np.uint8))
    return str(path)


# the command-line tests' tiny run (tests/test_cli.py, tests/training/test_train_command.py): two epochs of a
# K=2, L=2 model with 8 hidden channels, samples saved every epoch; ``TINY[2:]`` drops the epoch count
TINY_CLI_RUN = [
    "--n_epochs",
    "2",
    "--batch_size",
    "16",
    "--hidden_channels",
    "8",
    "--K",
    "2",
    "--L",
    "2",
    "--no_wandb",
    "--sample_and_save_freq",
    "1",
    "--warmup",
    "1",
]


def write_tiny_datasets(folder):
    """The command-line tests' data sets in ``folder``: {"in": smooth 16x16, "noise": noise 16x16,
    "big": smooth 32x32}, each an .npz path."""
    return {
        "in": write_smooth_npz(folder / "smooth.npz"),
        "noise": write_noise_npz(folder / "noise.npz"),
        "big": write_smooth_npz(folder / "big.npz", n=8, size=32),
    }


def interrupt_training(run, args, sig, timeout=600.0):
    """Start ``python -m glowflow --train --output_dir RUN *args`` in a subprocess, send it ``sig``
    once its first epoch's metrics row is written, and return (exit code, stderr).

    Robust to a slow, loaded machine: the signal is sent only once the run is in its training loop
    (its handlers installed, a row written: never during the import of torch), the wait for that is
    generous (``timeout`` seconds, but over as soon as the row is there), and the output goes to
    files, not pipes, so that a child writing much while nobody reads cannot block before the row.
    The run must be long (many epochs) so that it is still training when the signal lands."""
    out_path, err_path = run.parent / f"{run.name}.stdout", run.parent / f"{run.name}.stderr"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "glowflow", "--train", "--output_dir", str(run), *args], stdout=out, stderr=err
        )
        metrics = run / "metrics.csv"
        deadline = time.monotonic() + timeout
        try:
            while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
                if proc.poll() is not None:
                    raise AssertionError(f"training ended (exit {proc.returncode}) before its first metrics row")
                if time.monotonic() > deadline:
                    raise AssertionError(f"no metrics row after {timeout:.0f} s")
                time.sleep(0.05)
            proc.send_signal(sig)
            proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return proc.returncode, err_path.read_text()


def checkpoint_weights(path) -> dict:
    """The ``model`` state dict of a training checkpoint (read with ``weights_only=True``)."""
    return torch.load(path, weights_only=True)["model"]


def same_checkpoint_weights(a, b) -> bool:
    """Whether two training checkpoints hold bit-identical ``model`` weights (same names, equal tensors)."""
    a, b = checkpoint_weights(a), checkpoint_weights(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
