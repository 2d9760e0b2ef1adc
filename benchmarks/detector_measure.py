"""Measurements behind the README's "deployable detector" numbers, from one checkpoint.

    PYTHONPATH=. OMP_NUM_THREADS=1 python3 benchmarks/detector_measure.py \
        --checkpoint fmnist_epoch2.pt --cache /tmp/fmnist_epoch2_stats.npz \
        --json docs/detector_fashionmnist_epoch2.json

One pass over every training image, the test split and each outlier set computes the per-image
statistics of glowflow.ood.compute_statistics (same dequantisation seed 0 and loader order) and,
alongside, each image's top-level latent (for the class-conditional Mahalanobis score). The
statistics are cached in --cache (a plain .npz) so the analyses can be re-run in seconds. Then:

1. Reference size: the density of states fitted on seeded subsets of n training images
   (n = 1000 ... all 60000, 3 subset seeds each) against the development sets; justifies the
   detector's default of 10000 fit images (8000 for the reference, 2000 held back for the
   threshold).
2. Every score's AUROC against every set, with the reference as the detector fits it.
3. Mahalanobis distance to class-conditional Gaussians with a shared covariance (Lee et al.,
   2018) on the top-level latents, pooled over space or whole, as a candidate extra score.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from glowflow import data as data_module  # noqa: E402
from glowflow import ood  # noqa: E402
from glowflow.checkpoint import Checkpoint  # noqa: E402
from glowflow.ood.codecs import codec_bits_per_dim  # noqa: E402
from glowflow.ood.statistics import _batch_statistics  # noqa: E402
from glowflow.pixels import dequantize, preprocess  # noqa: E402

DEV = ("digits", "vflip:fashionmnist", "hflip:fashionmnist")
REPORTED = ("mnist5k", "noise", "constant")


@torch.inference_mode()
def one_pass(model, dataset, desc):
    """compute_statistics's numbers (same seed, order, batch 256) plus top latents and labels."""
    loader = data_module.make_loader(dataset, 256, shuffle=False)
    n_bits = model.config.n_bits
    g = torch.Generator().manual_seed(0)
    out, tops, labels = [], [], []
    t0 = time.time()
    for images, y in loader:
        x = dequantize(preprocess(images, n_bits), n_bits, g)
        batch = _batch_statistics(model, x, n_bits)
        batch["codec_bpd"] = codec_bits_per_dim(images, n_bits, "png")
        tops.append(model.forward_terms(x).latents[-1].flatten(1).double().numpy())
        labels.append(np.asarray(y).reshape(len(images), -1)[:, 0])
        out.append(batch)
    stats = {k: np.concatenate([b[k] for b in out]) for k in out[0]}
    stats["top"] = np.concatenate(tops).astype(np.float32)
    stats["labels"] = np.concatenate(labels)
    print(f"{desc}: {len(stats['bpd'])} images in {time.time() - t0:.1f} s", flush=True)
    return stats


def load_sets(args, model, in_name):
    shape = tuple(model.config.image_shape)
    if args.cache and os.path.exists(args.cache):
        with np.load(args.cache, allow_pickle=False) as f:
            sets = {}
            for key in f.files:
                name, field = key.split("|")
                sets.setdefault(name, {})[field] = f[key]
        return sets
    sets = {}
    for name, split in [("train", "train"), ("test", "test")] + [(n, "test") for n in DEV + REPORTED]:
        base = in_name if name in ("train", "test") else name
        size = shape[1] if base in data_module.SYNTHETIC else None
        ds = data_module.match_shape(data_module.load_dataset(base, split, args.data_root, size), shape)
        sets[name] = one_pass(model, ds, name)
    if args.cache:
        np.savez(args.cache, **{f"{n}|{k}": v for n, s in sets.items() for k, v in s.items()})
    return sets


def auroc(s_in, s_out):
    return ood.outlier_metrics(s_in, s_out)["auroc"]


def subset(stats, idx):
    return {k: v[idx] for k, v in stats.items()}


def reference_sizes(sets, outs):
    n = len(sets["train"]["bpd"])
    rows = []
    for size in (1000, 2000, 4000, 8000, 16000, 32000, n):
        for seed in (0, 1, 2) if size < n else (0,):
            idx = np.sort(np.random.default_rng(seed).permutation(n)[:size])
            ref = ood.fit_reference(subset(sets["train"], idx), seed=0)
            s_in = ood.outlier_scores(sets["test"], ref)["dos"]
            rows.append(
                dict(
                    n_reference=size,
                    subset_seed=seed,
                    auroc={o: auroc(s_in, ood.outlier_scores(sets[o], ref)["dos"]) for o in outs},
                )
            )
            print(size, seed, {k: round(v, 4) for k, v in rows[-1]["auroc"].items()}, flush=True)
    return rows


def mahalanobis(train_top, labels, pooled, k=10):
    """Lee et al. (2018): class means and one shared (tied) covariance of the features; score =
    min over classes of the squared Mahalanobis distance (higher = more outlying)."""

    def feats(top):
        top = np.asarray(top, dtype=np.float64)
        return top.reshape(len(top), -1, 16).mean(2) if pooled else top

    f = feats(train_top)
    means = np.stack([f[labels == c].mean(0) for c in range(k)])
    centred = f - means[labels]
    cov = centred.T @ centred / len(f) + 1e-6 * np.eye(f.shape[1])
    prec = np.linalg.inv(cov)

    def score(top):
        g = feats(top)
        d = np.stack([np.einsum("nd,de,ne->n", g - m, prec, g - m) for m in means], 1)
        return d.min(1)

    return score


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data_root", default="./data")
    p.add_argument("--cache", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    checkpoint = Checkpoint.read(args.checkpoint)
    model = checkpoint.load_model("cpu").eval()
    sets = load_sets(args, model, checkpoint.dataset)
    outs = [o for o in DEV + REPORTED if o in sets]
    result = {"checkpoint": args.checkpoint, "dev_sets": list(DEV), "reported_sets": list(REPORTED)}
    result["reference_size"] = reference_sizes(sets, outs)
    # 4000-image top-latent slice is 16 spatial positions of a 4x4 top level
    train = sets["train"]
    candidates = {}
    for pooled in (True, False):
        name = "mahalanobis_pooled" if pooled else "mahalanobis_full"
        fn = mahalanobis(train["top"], train["labels"].astype(np.int64), pooled)
        s_in = fn(sets["test"]["top"])
        candidates[name] = {o: auroc(s_in, fn(sets[o]["top"])) for o in outs}
        print(name, {k: round(v, 4) for k, v in candidates[name].items()}, flush=True)
    result["mahalanobis"] = candidates
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
