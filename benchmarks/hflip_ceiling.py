"""How separable are mirrored garments at all? An estimate of the ceiling of any detector on
hflip:fashionmnist, from the images alone (no model).

    PYTHONPATH=. python3 benchmarks/hflip_ceiling.py [--json docs/hflip_ceiling_fashionmnist.json]

For every Fashion-MNIST test image x (1x32x32, as glowflow reads it): the distance from its mirror
image hflip(x) to x, and from x to its nearest training image (Euclidean, pixels in [0, 1]). A
test image whose mirror lies closer to it than its nearest training neighbour does is mirrored
into the typical spread of the data: its mirror is as plausible a garment as any new test image.
If a share s of the outliers is indistinguishable from inliers in this sense, a detector that
ranks them at random among the inliers reaches at most about ``1 - s / 2`` AUROC. The printed
table also gives the share of images that are mirror-symmetric to within a few grey levels.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from glowflow import data  # noqa: E402


def flat(dataset) -> np.ndarray:
    loader = data.make_loader(dataset, 1000, shuffle=False)
    return torch.cat([images for images, _ in loader]).flatten(1).numpy().astype(np.float32)


def nearest_distances(queries: np.ndarray, pool: np.ndarray) -> np.ndarray:
    pool_sq = (pool * pool).sum(1)
    out = []
    for start in range(0, len(queries), 500):
        q = queries[start : start + 500]
        d2 = (q * q).sum(1)[:, None] - 2 * q @ pool.T + pool_sq[None]
        out.append(np.sqrt(np.maximum(d2.min(1), 0)))
    return np.concatenate(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json")
    args = p.parse_args(argv)
    train = flat(data.load_dataset("fashionmnist", "train", divisor=8))
    test = flat(data.load_dataset("fashionmnist", "test", divisor=8))
    side = int(round(np.sqrt(test.shape[1])))
    mirrored = test.reshape(-1, side, side)[:, :, ::-1].reshape(len(test), -1)
    to_mirror = np.sqrt(((test - mirrored) ** 2).sum(1))
    to_train = nearest_distances(test, train)
    rms_mirror = to_mirror / np.sqrt(test.shape[1])
    share_closer = float((to_mirror < to_train).mean())
    result = {
        "test_images": len(test),
        "mirror_closer_than_nearest_training_image": share_closer,
        "ceiling_auroc_estimate": 1 - share_closer / 2,
        "mirror_symmetric_within_2_grey_levels_rms": float((rms_mirror < 2 / 255).mean()),
        "mirror_symmetric_within_8_grey_levels_rms": float((rms_mirror < 8 / 255).mean()),
        "median_distance_to_mirror": float(np.median(to_mirror)),
        "median_distance_to_nearest_training_image": float(np.median(to_train)),
    }
    for key, value in result.items():
        print(f"{key:48s} {value:.4f}" if isinstance(value, float) else f"{key:48s} {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
