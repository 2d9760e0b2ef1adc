"""Latent-space outlier scores of a Glow: which were tried, and why the default is the density of
states with the top latent's class-Gaussian NLL as a column.

    OMP_NUM_THREADS=1 PYTHONPATH=. python3 benchmarks/latent_scores.py \
        --checkpoint fmnist_epoch2.pt --cache /tmp/latent_scores_epoch2.npz \
        --json docs/latent_scores_fashionmnist_epoch2.json

One pass (cached in --cache, a .npz of plain arrays, so that a re-run skips the model) computes,
for a seeded pool of --pool training images of the checkpoint's dataset (chosen as
glowflow.ood.OutlierDetector chooses its fit images), its test split and each outlier set:
glowflow.ood.compute_statistics (dequantisation noise seed 0, loader order, batch 256), and, in a
second loop with the same noise, every level's latent from model.forward_terms(x).latents (level 1
= the finest scale; the top level's latent must equal the statistics' top_latent, which checks
that both loops saw the same noise). For each --subset_seeds seed the pool is split as the
detector splits it (a seeded 20% held back for its threshold, the rest, 8000 images, to fit on),
each candidate below is fitted on the fit images, and its AUROC (test split inliers vs each
outlier set, higher score = more outlying) is averaged over the seeds. The table gives one row per
candidate and the mean over the development sets (--dev); --json writes every row, per seed too.
On one CPU thread (a busy 2-core machine) the pass took 2.5 minutes, each subset seed 30 s.

Candidates (z_i: level i's latent, flattened; the top level's is the statistics' top_latent):

1. dos levels+codec (old default): the density of states (Morningstar et al., 2021), a
   4-component Gaussian mixture of each level's bits/dim and the PNG codec's bits/dim
   (ood.fit_reference(statistics=("level_bpd", "codec_bpd"))), without the latent column.
2. maha shared z_i / pooled top: Mahalanobis distance to the nearest class mean with one shared
   (tied) covariance (Lee et al., 2018), on each level's latent and on the top latent averaged
   over space (one feature per channel).
3. class gauss z_i: one Gaussian per class with its own covariance, shrunk towards the identity
   (glowflow's top_gaussian: fit_latent_gaussians, top_gaussian_nll; Lee et al., 2018
   with per-class covariance, as in quadratic discriminant analysis); on the top level this is
   the package's top_gaussian score. single gauss top: one Gaussian, labels ignored.
4. knn top: distance to the k-th nearest fit image's top latent, k = 1 and 10, raw and
   L2-normalised (Sun et al., 2022, normalise).
5. Combinations of 1 (dos) and the top level's class Gaussians (top_gaussian):
   zsum: the sum of both scores, each standardised with its mean and std on the held-back images;
   fisher: Fisher's (1925) method, -2 sum log p over both scores, p the empirical p-value
   (1 + #held-back images scoring at least as high) / (n_held + 1);
   dos+top_gaussian (default): the density of states with top_gaussian as a column, the Gaussians
   and the mixture fitted on the same images (ood.fit_reference with its default statistics, what
   the detector fits);
   dos+top_gaussian cross-fit: the same, but the mixture's top_gaussian column of each fit image
   comes from Gaussians fitted on the other half of the fit images (2-fold cross-fitting, as in
   Chernozhukov et al., 2018); new images get the mean of both halves' NLLs.

Lee, Lee, Lee, Shin (2018), A simple unified framework for detecting out-of-distribution samples
and adversarial attacks, NeurIPS. Sun, Ming, Zhu, Li (2022), Out-of-distribution detection with
deep nearest neighbors, ICML. Morningstar et al. (2021), Density of states estimation for
out-of-distribution detection, AISTATS. Fisher (1925), Statistical methods for research workers.
Chernozhukov et al. (2018), Double/debiased machine learning, The Econometrics Journal.
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
from glowflow.ood.detector import (
    FIT_IMAGES,  # noqa: E402
    THRESHOLD_FRACTION,  # noqa: E402
)
from glowflow.ood.reference import dos_log_density, fit_latent_gaussians, model_fingerprint, top_gaussian_nll  # noqa: E402
from glowflow.ood.statistics import latent_features  # noqa: E402
from glowflow.pixels import dequantize, preprocess  # noqa: E402

OUT_SETS = ("digits", "vflip:fashionmnist", "hflip:fashionmnist", "mnist5k", "noise", "constant")
DEV_SETS = ("digits", "vflip:fashionmnist", "hflip:fashionmnist", "mnist5k")
BATCH = 256
CACHE_FORMAT = "glowflow-latent-scores-v1"


# ---------------------------------------------------------------------------------------- the pass


@torch.inference_mode()
def level_latents(model, loader, seed: int = 0):
    """Every level's latent (N, D_i) float32, and the top latent averaged over space (N, C), with
    the dequantisation noise of ood.compute_statistics (a CPU generator seeded with ``seed``,
    drawn in loader order)."""
    n_bits = model.config.n_bits
    generator = torch.Generator().manual_seed(seed)
    levels, pooled = [], []
    for images, _ in loader:
        x = dequantize(preprocess(images.to(torch.float32), n_bits), n_bits, generator)
        latents = model.forward_terms(x).latents
        levels.append([z.reshape(len(z), -1).float().numpy() for z in latents])
        pooled.append(latents[-1].mean((2, 3)).float().numpy())
    return [np.concatenate(level) for level in zip(*levels)], np.concatenate(pooled)


def one_pass(model, dataset, desc: str):
    """ood.compute_statistics of ``dataset`` plus ``z1`` .. ``z<L-1>`` (the top level's latent is
    ``top_latent``) and ``pooled_top``."""
    t0 = time.time()
    loader = data_module.make_loader(dataset, BATCH, shuffle=False)
    stats = ood.compute_statistics(model, loader, seed=0, desc=desc, progress=False)
    levels, stats["pooled_top"] = level_latents(model, loader, seed=0)
    top = latent_features(torch.from_numpy(levels[-1]).reshape(-1, *model.latent_shapes[-1])).numpy()
    gap = float(np.abs(top - stats["top_latent"]).max())
    if gap > 1e-4:
        raise SystemExit(f"{desc}: the latents differ from compute_statistics' top_latent by {gap:.3g}")
    for i, z in enumerate(levels[:-1]):
        stats[f"z{i + 1}"] = z
    print(f"{desc}: {len(stats['bpd'])} images in {time.time() - t0:.0f} s", flush=True)
    return stats


def read_sets(args, checkpoint, model):
    """{"pool", "test", each outlier set: arrays of one_pass}, from --cache when it was written
    for this model, pool and sets, else computed (and written to --cache)."""
    in_name, image_size = checkpoint.data_to_read(args.dataset, None)
    meta = dict(
        format=CACHE_FORMAT,
        model_sha256=model_fingerprint(model),
        in_dataset=in_name,
        pool=args.pool,
        sets=list(args.out_dataset),
    )
    if args.cache and os.path.exists(args.cache):
        with np.load(args.cache, allow_pickle=False) as f:
            cached = json.loads(str(f["meta"]))
            if cached != meta:
                raise SystemExit(f"{args.cache} was written for another model, pool or sets: remove it or pass another")
            sets = {}
            for key in f.files:
                if key != "meta":
                    name, field = key.split("|")
                    sets.setdefault(name, {})[field] = f[key]
        print(f"read {args.cache}")
        return in_name, sets
    shape = tuple(model.config.image_shape)
    # as glowflow --outlier_detection reads them (ood.command), and OutlierDetector picks its fit images
    train = data_module.load_dataset(in_name, "train", args.data_root, image_size, divisor=2**model.config.L)
    test = data_module.load_dataset(in_name, "test", args.data_root, image_size, divisor=2**model.config.L)
    if len(train) > args.pool:
        keep = np.random.default_rng(0).choice(len(train), args.pool, replace=False)
        train = torch.utils.data.Subset(train, np.sort(keep).tolist())
    sets = {"pool": one_pass(model, train, f"{in_name} train pool"), "test": one_pass(model, test, f"{in_name} test")}
    for name in args.out_dataset:
        size = shape[1] if name in data_module.SYNTHETIC else None
        images = data_module.match_shape(data_module.load_scored_images(name, args.data_root, size), shape)
        sets[name] = one_pass(model, images, name)
    if args.cache:
        arrays = {f"{n}|{k}": v for n, s in sets.items() for k, v in s.items()}
        np.savez(args.cache, meta=np.array(json.dumps(meta)), **arrays)
        print(f"wrote {args.cache}")
    return in_name, sets


# ---------------------------------------------------------------------------------- the candidates


def shared_mahalanobis(features, labels):
    """Lee et al. (2018): class means and one shared covariance (plus 1e-6 of its mean variance on
    the diagonal); the score is the squared Mahalanobis distance to the nearest class mean."""
    f = np.asarray(features, dtype=np.float64)
    classes = np.unique(labels)
    means = np.stack([f[labels == c].mean(0) for c in classes])
    centred = f - means[np.searchsorted(classes, labels)]
    cov = centred.T @ centred / len(f)
    cov += 1e-6 * np.mean(np.diag(cov)) * np.eye(len(cov))
    whiten = np.linalg.cholesky(np.linalg.inv(cov))  # ||(x - m) @ whiten||^2 = Mahalanobis^2
    centres = means @ whiten

    def score(x):
        y = np.asarray(x, dtype=np.float64) @ whiten
        d = (y * y).sum(1)[:, None] - 2 * y @ centres.T + (centres * centres).sum(1)[None]
        return d.min(1)

    return score


def knn_distance(features, ks, normalise):
    """Sun et al. (2022): the distance to the k-th nearest fit feature vector, for each k in
    ``ks`` (features L2-normalised first when ``normalise``)."""

    def prepare(x):
        x = np.asarray(x, dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True) if normalise else x

    f = prepare(features)
    f2 = (f * f).sum(1)

    def score(x):
        x = prepare(x)
        out = {k: [] for k in ks}
        for start in range(0, len(x), 1024):
            q = x[start : start + 1024]
            d2 = (q * q).sum(1)[:, None] - 2 * q @ f.T + f2[None]
            part = np.partition(d2, [k - 1 for k in ks], axis=1)
            for k in ks:
                out[k].append(np.sqrt(np.maximum(part[:, k - 1], 0)))
        return {k: np.concatenate(v) for k, v in out.items()}

    return score


def with_column(stats, values):
    """``stats`` with ``values`` in the ``logdet`` slot. fit_reference computes the top_gaussian
    column from its own Gaussians; a column from other Gaussians (the cross-fit's) reaches the
    mixture as the otherwise unused ``logdet`` statistic."""
    return {**stats, "logdet": values}


def level_name(key, levels):
    """z1, z2, ... for the split levels' keys; the top level's (top_latent) is z<L> (top)."""
    return f"z{len(levels)} (top)" if key == "top_latent" else key


def score_all(fit, targets, levels, seed):
    """{candidate: {set: scores}} for one fit/held-back split; ``targets`` (set -> statistics)
    includes "held"."""
    labels = fit["labels"]
    out = {}

    def add(name, fn):
        out[name] = {k: np.asarray(fn(s), dtype=np.float64) for k, s in targets.items()}

    # 1. the old default; 2. shared-covariance Mahalanobis; 3. class Gaussians; 4. k nearest neighbours
    top = fit_latent_gaussians(fit["top_latent"], labels)
    old = ood.fit_reference(fit, statistics=("level_bpd", "codec_bpd"), latent=top)
    add("dos levels+codec (old default)", lambda s: -dos_log_density(old, s))
    for key in levels:
        maha = shared_mahalanobis(fit[key], labels)
        add(f"maha shared {level_name(key, levels)}", lambda s, m=maha, key=key: m(s[key]))
    maha = shared_mahalanobis(fit["pooled_top"], labels)
    add("maha shared pooled top", lambda s: maha(s["pooled_top"]))
    for key in levels:
        gauss = top if key == "top_latent" else fit_latent_gaussians(fit[key], labels)
        add(f"class gauss {level_name(key, levels)}", lambda s, g=gauss, key=key: top_gaussian_nll(g, s[key]))
    single = fit_latent_gaussians(fit["top_latent"], None)
    add("single gauss top", lambda s: top_gaussian_nll(single, s["top_latent"]))
    for normalise in (False, True):
        knn = knn_distance(fit["top_latent"], (1, 10), normalise)
        dists = {k: knn(s["top_latent"]) for k, s in targets.items()}
        for kk in (1, 10):
            out[f"knn top k={kk}{' l2-normalised' if normalise else ''}"] = {k: d[kk] for k, d in dists.items()}

    # 5. combinations of the old dos and top_gaussian
    dos, tg = out["dos levels+codec (old default)"], out[f"class gauss {level_name('top_latent', levels)}"]

    def standardised(scores, k):
        return (scores[k] - scores["held"].mean()) / scores["held"].std()

    def log_p(scores, k):  # log of the empirical p-value (1 + #held-back scores >= score) / (n + 1)
        held = np.sort(scores["held"])
        return np.log((1 + len(held) - np.searchsorted(held, scores[k], side="left")) / (len(held) + 1))

    out["zsum dos + top_gaussian"] = {k: standardised(dos, k) + standardised(tg, k) for k in targets}
    out["fisher dos + top_gaussian"] = {k: -2 * (log_p(dos, k) + log_p(tg, k)) for k in targets}
    joint = ood.fit_reference(fit, latent=top)
    assert "top_gaussian" in joint.dos_features, joint.dos_features
    out["dos+top_gaussian (default)"] = {k: -dos_log_density(joint, s, tg[k]) for k, s in targets.items()}

    n = len(labels)  # cross-fit halves of the fit images, seeded with the subset seed
    order = np.random.default_rng(seed).permutation(n)
    halves = [np.sort(order[: n // 2]), np.sort(order[n // 2 :])]
    gauss = [fit_latent_gaussians(fit["top_latent"][h], labels[h]) for h in halves]
    out_of_fold = np.empty(n)
    for h, other in zip(halves, gauss[::-1]):
        out_of_fold[h] = top_gaussian_nll(other, fit["top_latent"][h])
    cross = ood.fit_reference(
        with_column(fit, out_of_fold), statistics=("level_bpd", "logdet", "codec_bpd"), latent=top
    )
    out["dos+top_gaussian cross-fit"] = {}
    for k, s in targets.items():
        column = np.mean([top_gaussian_nll(g, s["top_latent"]) for g in gauss], 0)
        out["dos+top_gaussian cross-fit"][k] = -dos_log_density(cross, with_column(s, column))
    return out


# ---------------------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--dataset", default=None, help="in-distribution data (default: the checkpoint's)")
    p.add_argument("--out_dataset", nargs="+", default=list(OUT_SETS))
    p.add_argument("--dev", nargs="*", default=list(DEV_SETS), help="sets whose mean AUROC the table gives")
    p.add_argument("--pool", type=int, default=FIT_IMAGES, help="training images (the detector's fit images)")
    p.add_argument("--subset_seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--data_root", default="./data")
    p.add_argument("--cache", default=None, help=".npz of the pass's arrays (read when it exists)")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    checkpoint = Checkpoint.read(args.checkpoint)
    model = checkpoint.load_model("cpu").eval()
    in_name, sets = read_sets(args, checkpoint, model)
    pool = sets["pool"]
    levels = sorted((k for k in pool if k[0] == "z" and k[1:].isdigit()), key=lambda k: int(k[1:])) + ["top_latent"]
    outs = list(args.out_dataset)
    n_pool = len(pool["bpd"])
    held = int(round(THRESHOLD_FRACTION * n_pool))
    per_seed = []
    for seed in args.subset_seeds:
        t0 = time.time()
        order = np.random.default_rng(seed).permutation(n_pool)  # OutlierDetector.fit's hold-back
        fit = {k: v[np.sort(order[held:])] for k, v in pool.items()}
        targets = {"held": {k: v[np.sort(order[:held])] for k, v in pool.items()}, "test": sets["test"]}
        targets.update((name, sets[name]) for name in outs)
        scores = score_all(fit, targets, levels, seed)
        per_seed.append(
            {c: {o: ood.outlier_metrics(s["test"], s[o])["auroc"] for o in outs} for c, s in scores.items()}
        )
        print(f"subset seed {seed}: {time.time() - t0:.0f} s", flush=True)

    dev = [o for o in args.dev if o in outs]
    rows = []
    for c in per_seed[0]:
        auroc = {o: float(np.mean([a[c][o] for a in per_seed])) for o in outs}
        dev_means = [float(np.mean([a[c][o] for o in dev])) for a in per_seed] if dev else []
        rows.append(
            dict(
                candidate=c,
                auroc=auroc,
                auroc_per_seed=[a[c] for a in per_seed],
                mean_dev=float(np.mean(dev_means)) if dev else None,
                mean_dev_sd_over_seeds=float(np.std(dev_means)) if dev else None,
            )
        )
    print(
        f"\n{in_name} test (in) vs each set: AUROC, mean over subset seeds {args.subset_seeds} "
        f"({n_pool - held} fit images of a {n_pool}-image pool); dev = mean over {dev}, sd over seeds"
    )
    short = [o.split(":")[0] for o in outs]
    width = max(9, *(len(s) + 2 for s in short))
    print(f"{'candidate':<38}" + "".join(f"{s:>{width}}" for s in short) + f"{'dev':>8}{'sd':>7}")
    for r in rows:
        tail = "" if r["mean_dev"] is None else f"{r['mean_dev']:>8.4f}{r['mean_dev_sd_over_seeds']:>7.4f}"
        print(f"{r['candidate']:<38}" + "".join(f"{r['auroc'][o]:>{width}.4f}" for o in outs) + tail)
    if args.json:
        result = dict(
            command=" ".join(sys.argv),
            checkpoint=args.checkpoint,
            in_dataset=in_name,
            pool=n_pool,
            fit_images=n_pool - held,
            held_back=held,
            subset_seeds=args.subset_seeds,
            sets=outs,
            dev_sets=dev,
            rows=rows,
        )
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
