"""Near outliers: the orientation scores that were tried, and why the default is ``dos_orientation``.

    OMP_NUM_THREADS=1 PYTHONPATH=. python3 benchmarks/orientation_scores.py \
        --checkpoint fmnist_epoch2.pt --out_dataset vflip:fashionmnist hflip:fashionmnist digits mnist5k \
        --cache /tmp/orientation_epoch2.npz --json docs/orientation_scores_fashionmnist_epoch2.json

One pass per set (cached in --cache, a .npz of plain arrays) computes glowflow.ood.compute_statistics
with the bits/dim of every transform of glowflow.ood.statistics.TRANSFORMS (vflip, hflip, rot90,
rot180, rot270), for a seeded pool of --pool training images of the checkpoint's dataset, its test
split and each outlier set (at most --max images each, seeded). The pool is split as the detector
splits it (a seeded fifth held back for the threshold and the standardisations, the rest to fit
on), and each candidate's AUROC (test split inliers vs each outlier set, higher = more outlying)
is printed, with the mean over the development sets (--dev). Candidates:

1. dos: the density of states as shipped before (levels + codec + top-latent class Gaussians).
2. margin alone, per transform t: ``bpd(x) - bpd(t(x))``.
3. orientation over a set of transforms: ``log(1 + sum_t exp(z_t))`` of the margins standardised
   on the fit images (glowflow.ood.orientation), alone and added to dos after standardising both
   on the held-back images (``dos_orientation``, the default with vflip and rot90).
4. other ways in: the margins as columns of the density of states (two-sided), and the largest
   margin added to dos.
5. label-free: the same with one Gaussian for the top latent instead of one per class.
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
from glowflow.ood.orientation import combined_score, fit_orientation, orientation_score  # noqa: E402
from glowflow.ood.reference import dos_log_density, fit_latent_gaussians, fit_reference, model_fingerprint  # noqa: E402  # noqa: E402
from glowflow.ood.statistics import TRANSFORMS  # noqa: E402

ALL = tuple(TRANSFORMS)
DEV = ("vflip:fashionmnist", "digits", "mnist5k", "fashionmnist:classes=8,9")
CACHE_FORMAT = "glowflow-orientation-scores-v1"
KEYS = ("bpd", "level_bpd", "codec_bpd", "top_latent", "labels", "transform_bpd")


def subset(dataset, limit: int, seed: int = 0):
    if limit and len(dataset) > limit:
        keep = np.sort(np.random.default_rng(seed).choice(len(dataset), limit, replace=False))
        return torch.utils.data.Subset(dataset, keep.tolist())
    return dataset


def read_sets(args):
    """{"pool", "test", each outlier set: statistics with every transform}, from --cache when it
    was written for this checkpoint and these sets."""
    checkpoint = Checkpoint.read(args.checkpoint)
    model = checkpoint.load_model("cpu")
    in_name, image_size = checkpoint.data_to_read(None, None)
    meta = dict(
        format=CACHE_FORMAT, model=model_fingerprint(model), pool=args.pool, max=args.max, sets=args.out_dataset
    )
    if args.cache and os.path.exists(args.cache):
        with np.load(args.cache, allow_pickle=False) as f:
            if json.loads(str(f["meta"])) != meta:
                raise SystemExit(f"{args.cache} was written for another model or sets: remove it")
            sets = {}
            for key in f.files:
                if key != "meta":
                    name, field = key.split("|")
                    sets.setdefault(name, {})[field] = f[key]
        return in_name, sets
    shape = tuple(model.config.image_shape)
    divisor = 2**model.config.L
    # the training images less the run's validation split, as the detector reads them
    train = data_module.load_dataset(in_name, "train", "./data", image_size, divisor=divisor)
    split = checkpoint.validation_split(in_name)
    if split is not None:
        train = data_module.split_validation(train, *split)[0]
    named = {
        "pool": subset(train, args.pool),
        "test": subset(data_module.load_dataset(in_name, "test", "./data", image_size, divisor=divisor), args.max),
    }
    for name in args.out_dataset:
        size = shape[1] if name in data_module.SYNTHETIC else None
        named[name] = subset(
            data_module.match_shape(data_module.load_scored_images(name, "./data", size), shape), args.max
        )
    sets = {}
    for name, dataset in named.items():
        t0 = time.time()
        loader = data_module.make_loader(dataset, 256, shuffle=False)
        stats = ood.compute_statistics(model, loader, seed=0, desc=name, progress=False, transforms=ALL)
        sets[name] = {k: stats[k] for k in KEYS}
        print(f"{name}: {len(dataset)} images in {time.time() - t0:.0f} s", flush=True)
    if args.cache:
        arrays = {f"{n}|{k}": v for n, s in sets.items() for k, v in s.items()}
        np.savez(args.cache, meta=np.array(json.dumps(meta)), **arrays)
    return in_name, sets


def rows(stats, index):
    return {k: v[index] for k, v in stats.items()}


def only(stats, transforms):
    """``stats`` with ``transform_bpd`` narrowed to ``transforms`` (columns in ALL's order)."""
    out = dict(stats)
    out["transform_bpd"] = stats["transform_bpd"][:, [ALL.index(t) for t in transforms]]
    return out


def candidates(sets, fit, held, labels_used: bool):
    """{name: function(set name) -> (N,) scores} of every candidate."""
    pool = sets["pool"]
    fit_stats, held_stats = rows(pool, fit), rows(pool, held)
    latent = fit_latent_gaussians(fit_stats["top_latent"], fit_stats["labels"] if labels_used else None)
    reference = fit_reference(fit_stats, latent=latent)
    dos = {name: -dos_log_density(reference, s) for name, s in sets.items()}
    dos["held"] = -dos_log_density(reference, held_stats)
    margins = {name: s["bpd"][:, None] - s["transform_bpd"] for name, s in sets.items()}
    found = {"dos": lambda name: dos[name]}
    for t in ALL:
        found[f"margin {t}"] = lambda name, j=ALL.index(t): margins[name][:, j]

    def oriented(transforms, tag):
        orientation = fit_orientation(
            only(fit_stats, transforms), transforms, only(held_stats, transforms), dos["held"]
        )
        found[f"orientation {tag}"] = lambda name: orientation_score(orientation, only(sets[name], transforms))
        found[f"dos_orientation {tag}"] = lambda name: combined_score(
            orientation, dos[name], orientation_score(orientation, only(sets[name], transforms))
        )

    for transforms in (("vflip", "rot90"), ("vflip",), ("rot90",), ("vflip", "rot90", "rot180", "rot270"), ALL):
        oriented(transforms, "[" + ",".join(transforms) + "]")
    # the margins as density-of-states columns (two-sided, unlike orientation)
    from sklearn.mixture import GaussianMixture

    def dos_with(extra):
        def features(s, d):
            return np.column_stack([d] + [extra(s)])

        f = features(fit_stats, dos["pool"][fit])
        mean, std = f.mean(0), f.std(0)
        gm = GaussianMixture(4, covariance_type="full", reg_covar=1e-6, random_state=0).fit((f - mean) / std)
        return lambda name: -gm.score_samples((features(sets[name], dos[name]) - mean) / std)

    pair = ("vflip", "rot90")
    found["dos + margins as mixture columns [vflip,rot90]"] = dos_with(
        lambda s: s["bpd"][:, None] - only(s, pair)["transform_bpd"]
    )
    found["max margin [vflip,rot90] + dos (standardised)"] = _zsum(
        [lambda name: dos[name], lambda name: margins[name][:, [ALL.index(t) for t in pair]].max(1)], sets, held
    )
    return found


def _zsum(functions, sets, held):
    held_values = [f("pool")[held] for f in functions]
    return lambda name: sum((f(name) - h.mean()) / h.std() for f, h in zip(functions, held_values))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out_dataset", nargs="+", required=True)
    p.add_argument("--pool", type=int, default=10000)
    p.add_argument("--max", type=int, default=5000, help="at most this many images of the test split and each set")
    p.add_argument("--dev", nargs="+", default=list(DEV))
    p.add_argument("--cache")
    p.add_argument("--json")
    args = p.parse_args(argv)
    in_name, sets = read_sets(args)
    n = len(sets["pool"]["bpd"])
    order = np.random.default_rng(0).permutation(n)
    held, fit = np.sort(order[: n // 5]), np.sort(order[n // 5 :])
    outs = list(args.out_dataset)
    table = {}
    for labels_used in (True, False):
        found = candidates(sets, fit, held, labels_used)
        for name, score in found.items():
            inliers = score("test")
            aurocs = {o: ood.outlier_metrics(inliers, score(o))["auroc"] for o in outs}
            dev = [aurocs[o] for o in outs if o in args.dev]
            key = f"{name} ({'labels' if labels_used else 'label-free'})"
            table[key] = dict(aurocs, dev_mean=float(np.mean(dev)) if dev else None)
    width = max(len(k) for k in table)
    print(f"{'candidate':{width}s} " + " ".join(f"{o[:12]:>12s}" for o in outs) + "     dev")
    for key, row in table.items():
        dev = "-" if row["dev_mean"] is None else f"{row['dev_mean']:.3f}"
        print(f"{key:{width}s} " + " ".join(f"{row[o]:12.3f}" for o in outs) + f"  {dev:>6s}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(
                    checkpoint=args.checkpoint,
                    in_dataset=in_name,
                    pool=args.pool,
                    max=args.max,
                    dev=args.dev,
                    aurocs=table,
                ),
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
