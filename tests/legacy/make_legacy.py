"""Writes the legacy checkpoints in this folder and the values they must keep giving.

Run once, on the commit that wrote the checkpoints (0484b49, before the one-way layout), from
the repository root:  python3 tests/legacy/make_legacy.py
It trains two tiny runs through the command line and records, with the public API only, what
tests/test_legacy_checkpoints.py checks: log_prob and bits/dim of fixed images (fast and plain
path), reconstructions, samples at a seed, the command line's sample sheet, and the outlier
statistics and scores.
"""

import json
import os
import shutil
import sys
import tempfile

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import glowflow  # noqa: E402
from glowflow import ood  # noqa: E402
from glowflow.cli import main  # noqa: E402
from tests.helpers import write_smooth_npz  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
KINDS = {
    # the default architecture (hidden 64, K 8, L 3, affine, invconv), unconditional
    "uncond_default": dict(size=32, flags=[]),
    # y_condition + LU + shuffle + additive + learn_top + n_bits 5, small
    "cond_lu_shuffle_additive_5bit": dict(
        size=16,
        flags=[
            "--y_condition",
            "--LU_decomposed",
            "--flow_permutation",
            "shuffle",
            "--flow_coupling",
            "additive",
            "--learn_top",
            "--n_bits",
            "5",
            "--hidden_channels",
            "16",
            "--K",
            "2",
            "--L",
            "2",
        ],
    ),
}


def fixed_images(size, n=8, seed=123):
    """(n, 1, size, size) images in [0, 1] on the 8-bit grid, and labels 0..2."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    phase = torch.rand(n, 1, 1, generator=g) * 6
    a, b = torch.rand(n, 1, 1, generator=g) * 2 - 1, torch.rand(n, 1, 1, generator=g) * 2 - 1
    images = 0.5 + 0.4 * torch.sin(3 * (a * xx + b * yy) + phase)
    pixels = torch.round(images * 255).clamp(0, 255)
    return (pixels / 255).unsqueeze(1).float(), torch.arange(n) % 3


def measure(checkpoint, size, keep=None):
    """(values, arrays): every number and picture the test compares, from ``checkpoint``. With a dict
    ``keep``, also puts there the model and the outlier statistics and reference inputs (``ood``: the
    training, in and out statistics), so that the test can measure how the scores respond to float32
    rounding of the statistics."""
    model = glowflow.load_checkpoint(checkpoint)
    payload = torch.load(checkpoint, weights_only=True)
    n_bits = int(payload["run_config"]["n_bits"])
    images, labels = fixed_images(size)
    x = glowflow.preprocess(images, n_bits)
    xd = glowflow.dequantize(x, n_bits, torch.Generator().manual_seed(0))
    values = {"n_bits": n_bits}
    with torch.no_grad():
        for fast in (True, False):
            model.fast = fast
            tag = "fast" if fast else "plain"
            values[f"log_prob_{tag}"] = model.log_prob(xd).double().tolist()
            values[f"bpd_{tag}"] = model.bits_per_dim(xd).double().tolist()
            if model.config.y_condition:
                values[f"log_prob_labels_{tag}"] = model.log_prob(xd, labels).double().tolist()
        model.fast = True
        latents, logdet = model.encode(x)
        values["logdet"] = logdet.double().tolist()
        values["latent_norms"] = [float(z.double().norm()) for z in latents]
        torch.manual_seed(0)
        samples = glowflow.postprocess(model.sample(8, temperature=0.7), n_bits)
    arrays = {"samples_T0.7_seed0": (samples * 255).round().to(torch.uint8).numpy()}

    with tempfile.TemporaryDirectory() as tmp:
        assert (
            main(
                [
                    "--sample",
                    "--checkpoint",
                    checkpoint,
                    "--output_dir",
                    tmp,
                    "--n_samples",
                    "4",
                    "--temperature",
                    "0",
                    "0.7",
                ]
            )
            == 0
        )
        arrays["cli_samples_temperatures"] = np.asarray(Image.open(os.path.join(tmp, "samples_temperatures.png")))

    train_images, _ = fixed_images(size, n=64, seed=7)
    noise = torch.rand(16, 1, size, size, generator=torch.Generator().manual_seed(9))
    noise = torch.round(noise * 255) / 255
    stats_train = ood.compute_statistics(model, [(train_images, None)], n_bits, progress=False)
    stats_in = ood.compute_statistics(model, [(images, None)], n_bits, progress=False)
    stats_out = ood.compute_statistics(model, [(noise, None)], n_bits, progress=False)
    values.update(ood_values(stats_train, stats_in, stats_out))
    if keep is not None:
        keep.update(model=model, ood=(stats_train, stats_in, stats_out))
    return values, arrays


def ood_values(stats_train, stats_in, stats_out):
    """The outlier scores (and codec bits/dim) of the in and out statistics, against a reference
    fitted on ``stats_train``."""
    values = {}
    # The density of states of 0484b49 (its default statistics), and only its scores: the
    # top-latent Gaussian statistic and score came later (pinned and left out here since then), as
    # did `combined` (here, with no orientation part and no classifier, `dos` itself).
    reference = ood.fit_reference(stats_train, components=2, statistics=("level_bpd", "codec_bpd"))
    for part, stats in (("in", stats_in), ("out", stats_out)):
        for key, v in ood.outlier_scores(stats, reference).items():
            if key in ("top_gaussian", "combined"):
                continue
            values[f"ood_{part}_{key}"] = np.asarray(v, dtype=np.float64).tolist()
        values[f"ood_{part}_codec_bpd"] = stats["codec_bpd"].tolist()
    return values


def record(name, checkpoint, size):
    values, arrays = measure(checkpoint, size)
    np.savez(os.path.join(HERE, f"{name}_pictures.npz"), **arrays)
    with open(os.path.join(HERE, f"{name}_expected.json"), "w") as f:
        json.dump(values, f, indent=1)
        f.write("\n")


def build():
    with tempfile.TemporaryDirectory() as tmp:
        for name, kind in KINDS.items():
            data = write_smooth_npz(os.path.join(tmp, f"{name}.npz"), n=64, size=kind["size"])
            out = os.path.join(tmp, name)
            torch.manual_seed(0)
            assert (
                main(
                    [
                        "--train",
                        "--dataset",
                        data,
                        "--output_dir",
                        out,
                        "--no_wandb",
                        "--batch_size",
                        "16",
                        "--n_epochs",
                        "1",
                        "--max_steps",
                        "3",
                        "--lr",
                        "1e-3",
                        "--warmup",
                        "1",
                        "--sample_and_save_freq",
                        "0",
                        *kind["flags"],
                    ]
                )
                == 0
            )
            target = os.path.join(HERE, f"{name}.pt")
            shutil.copy(os.path.join(out, "last.pt"), target)
            record(name, target, kind["size"])
            print(f"wrote {target}")


if __name__ == "__main__":
    build()
