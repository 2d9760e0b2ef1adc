"""A 28-pixel grey set trained at its native size (--image_size 28 --L 2): training, sampling,
reconstruction and outlier detection all follow the checkpoint's 28x28."""

import json
import math

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
    report_path = ood / "ood_grey28_vs_noise.json"
    report = json.loads(report_path.read_text())
    # the 48 images split 39 train / 4 validation / 5 test; every image of the test split is scored
    assert report["in_dataset"] == data and report["out_dataset"] == "noise" and report["n_bits"] == 8
    assert report["n_in"] == 5 and report["n_out"] > 0 and report["reference"]["n_train"] == 39
    assert report["files"]["json"] == str(report_path)
    bpd = report["bits_per_dim"]
    assert 0 < bpd["in"] < bpd["out"] and math.isfinite(bpd["out"])  # noise is far less likely than the set
    # the checkpoint's two levels (L 2 at 28 pixels: 14 and 7), each with its own score
    assert {"level_1_bpd", "level_2_bpd"} <= set(report["scores"]) and "level_3_bpd" not in report["scores"]
    assert set(report["score_definitions"]) == set(report["scores"])
    assert all(0.0 <= m["auroc"] <= 1.0 for m in report["scores"].values())
    assert report["scores"]["nll"]["auroc"] > 0.9  # smooth gradients against uniform noise
