"""A 28-pixel grey set trained at its native size (--image_size 28 --L 2): training, sampling,
reconstruction and outlier detection all follow the checkpoint's 28x28."""

import numpy as np
from PIL import Image

from glowflow.cli import main
from tests.helpers import write_smooth_npz

TINY = ["--hidden_channels", "8", "--K", "2", "--batch_size", "16", "--n_epochs", "1", "--no_wandb", "--warmup", "1"]


def test_native_28_pixel_training_sampling_and_outliers(tmp_path):
    data = write_smooth_npz(tmp_path / "grey28.npz", n=48, size=28)
    out = tmp_path / "run"
    assert main(["--train", "--dataset", data, "--image_size", "28", "--L", "2", "--output_dir", str(out), *TINY]) == 0
    checkpoint = str(out / "Glow_grey28.pt")
    samples = tmp_path / "samples"
    assert (
        main(
            ["--sample", "--checkpoint", checkpoint, "--output_dir", str(samples), "--n_samples", "4", "--reconstruct"]
        )
        == 0
    )
    grid = np.asarray(Image.open(samples / "samples_T0.7.png"))
    assert grid.shape[:2] == (2 * 28 + 3 * 2, 2 * 28 + 3 * 2)  # 2x2 images of 28 pixels, padding 2
    ood = tmp_path / "ood"
    assert (
        main(["--outlier_detection", "--checkpoint", checkpoint, "--output_dir", str(ood), "--out_dataset", "noise"])
        == 0
    )
    assert (ood / "ood_grey28_vs_noise.json").exists()
