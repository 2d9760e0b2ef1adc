"""Which statistics should the density of states (the `dos` outlier score) be fitted on?

    PYTHONPATH=. python3 benchmarks/dos_statistics.py --checkpoint run/Glow_fashionmnist.pt \
        --out_dataset digits vflip:fashionmnist hflip:fashionmnist mnist5k

Computes every per-image statistic once (glowflow.ood.compute_statistics: each level's bits/dim,
the log-det, each level's latent RMS, the PNG codec's bits/dim, the top latent and the label) for
a seeded pool of --pool training images, the test images and each outlier set, then fits the
density of states as the detector does (glowflow.ood.fit_reference on --fit_images of the pool,
one seeded subset per --subset_seeds) on several choices of statistics and numbers of mixture
components, and prints the mean AUROC over the subsets against each outlier set, with the mean
over the sets named by --select (the sets the choice is made on; the others are reported, not
used to choose). --json writes it all. The README's "Choosing the statistics" table comes from
this script.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from glowflow import data as data_module  # noqa: E402
from glowflow import ood  # noqa: E402
from glowflow.checkpoint import Checkpoint  # noqa: E402
from glowflow.ood.reference import DOS_STATISTICS, dos_log_density, fit_latent_gaussians, top_gaussian_nll  # noqa: E402

CHOICES = {
    "levels+codec+top (default)": DOS_STATISTICS,
    "levels+logdet+codec+top": ("level_bpd", "logdet", "codec_bpd", "top_gaussian"),
    "levels+top": ("level_bpd", "top_gaussian"),
    "codec+top": ("codec_bpd", "top_gaussian"),
    "top": ("top_gaussian",),
    "levels": ("level_bpd",),
    "levels+codec": ("level_bpd", "codec_bpd"),
    "levels+logdet+rms": ("level_bpd", "logdet", "latent_rms"),
    "levels+logdet+rms+codec": ("level_bpd", "logdet", "latent_rms", "codec_bpd"),
    "levels+logdet+codec": ("level_bpd", "logdet", "codec_bpd"),
    "levels+rms+codec": ("level_bpd", "latent_rms", "codec_bpd"),
    "bpd+codec": ("bpd", "codec_bpd"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--dataset", default=None, help="in-distribution data (default: the checkpoint's)")
    p.add_argument("--out_dataset", nargs="+", required=True)
    p.add_argument(
        "--select",
        nargs="*",
        default=None,
        help="outlier sets whose mean AUROC ranks the choices (default: all of --out_dataset)",
    )
    p.add_argument("--pool", type=int, default=10_000, help="training images the statistics are computed for")
    p.add_argument("--fit_images", type=int, default=8000, help="of them, the reference is fitted on (the detector's)")
    p.add_argument("--subset_seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--data_root", default="./data")
    p.add_argument("--components", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--max_images", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    checkpoint = Checkpoint.read(args.checkpoint)
    model = checkpoint.load_model("cpu")
    n_bits = model.config.n_bits
    in_name = args.dataset or checkpoint.dataset
    shape = tuple(model.config.image_shape)

    def stats(name, split, pool=None):
        size = shape[1] if name in data_module.SYNTHETIC else None
        ds = data_module.match_shape(data_module.load_dataset(name, split, args.data_root, size), shape)
        if pool is not None and len(ds) > pool:
            keep = np.random.default_rng(0).choice(len(ds), pool, replace=False)
            ds = torch.utils.data.Subset(ds, np.sort(keep).tolist())
        loader = data_module.make_loader(ds, 256, shuffle=False)
        return ood.compute_statistics(model, loader, n_bits, max_images=args.max_images, desc=f"{name} {split}")

    pool, test = stats(in_name, "train", args.pool), stats(in_name, "test")
    outs = {name: stats(name, "test") for name in args.out_dataset}
    select = args.select if args.select is not None else list(outs)
    n_pool = pool["bpd"].size
    fits = []  # (statistics, class Gaussians, top_gaussian of the test set and each outlier set) per subset
    for seed in args.subset_seeds:
        keep = np.sort(np.random.default_rng(seed).permutation(n_pool)[: min(args.fit_images, n_pool)])
        train = {key: value[keep] for key, value in pool.items()}
        latent = fit_latent_gaussians(train["top_latent"], train["labels"])
        tops = {name: top_gaussian_nll(latent, s["top_latent"]) for name, s in [("test", test), *outs.items()]}
        fits.append((train, latent, tops))
    rows = []
    for label, statistics in CHOICES.items():
        for k in args.components:
            per_fit = []
            for train, latent, tops in fits:
                reference = ood.fit_reference(train, statistics=statistics, components=k, latent=latent)
                scores_in = -dos_log_density(reference, test, tops["test"])
                per_fit.append(
                    {
                        name: ood.outlier_metrics(scores_in, -dos_log_density(reference, s, tops[name]))["auroc"]
                        for name, s in outs.items()
                    }
                )
            aurocs = {name: float(np.mean([a[name] for a in per_fit])) for name in outs}
            chosen = [aurocs[n] for n in select if n in aurocs]
            rows.append(
                {
                    "statistics": label,
                    "columns": list(reference.dos_features),
                    "components": k,
                    "auroc": aurocs,
                    "auroc_per_subset": per_fit,
                    "mean_selected": float(np.mean(chosen)) if chosen else None,
                }
            )
    width = max(12, *(len(n) + 2 for n in outs))
    print(f"density of states, {in_name} (in) vs each set: AUROC; mean over {select}")
    print(f"{'statistics':<26}{'k':>3}" + "".join(f"{n:>{width}}" for n in outs) + f"{'mean':>8}")
    for r in rows:
        mean = "-" if r["mean_selected"] is None else f"{r['mean_selected']:.4f}"
        print(
            f"{r['statistics']:<26}{r['components']:>3}"
            + "".join(f"{r['auroc'][n]:>{width}.4f}" for n in outs)
            + f"{mean:>8}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"checkpoint": args.checkpoint, "in_dataset": in_name, "select": select, "rows": rows}, f, indent=2
            )
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
