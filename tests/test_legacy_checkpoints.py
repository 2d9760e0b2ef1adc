"""Checkpoints written before the one-way layout (commit 0484b49) still load and give the same
numbers and pictures: log_prob, bits/dim, log-dets, latent norms, samples at a seed and the outlier
scores, each to the float32 rounding that another CPU's kernels may give it. The files and the
generator are in tests/legacy/.

Why these tolerances. The stored numbers are float32 results of one CPU; another CPU (other SIMD
widths, other oneDNN/MKL kernels, other thread counts) rounds differently, so exact or 1e-6
comparisons fail on a fresh machine (issue 19: -6.24755859 against the stored -6.24752808). A
float32 result is wrong by about eps = 2**-23 times the size of the numbers it was computed from,
times the number of roundings they went through in sequence: here the ``depth`` K * L flow steps
(each rounds the activations and adds a log-det term) plus log2(D) levels of the pairwise sums over
the D dimensions. The size that counts for a log-density is not its own: log_prob = log-det +
prior log-density, two terms of hundreds or thousands of nats whose sum may be -6, so its rounding
is that of |logdet| + |log_prob - logdet|. Measured on one machine under every kernel choice
PyTorch offers (ATen default/AVX2/AVX512, oneDNN capped at SSE4.1/AVX2, MKL capped at SSE4.2, one
or two threads) the largest deviations stay at least 14x under these tolerances. Checked by breaking
the loaded model on purpose: an ActNorm log-scale moved by 1e-3, one log-det term dropped, two
channels of a permutation swapped all fail (300x to 10^6x past a tolerance), as does the first
coupling weight moved by 1e-3 (20x, and 2x on the default model); a change as small as float32's
own rounding across CPUs (a weight of the last, zero-initialised convolution moved by 1e-3 moves
log_prob by 1e-3 nats of 2300) cannot be told from that rounding and is not caught."""

import json
import math
import os

import numpy as np
import pytest

from tests.legacy.make_legacy import HERE, KINDS, measure, ood_values

EPS32 = 2.0**-23  # float32's relative precision (the spacing of floats in [1, 2))


def _depth(config):
    """Roundings in sequence: K * L flow steps, then a pairwise sum over the D = C * H * W dimensions."""
    return config.K * config.L + math.ceil(math.log2(math.prod(config.image_shape)))


def _check(name, key, got, want, tol):
    got, want, tol = (np.asarray(v, dtype=np.float64) for v in (got, want, tol))
    assert got.shape == want.shape, (name, key, got.shape, want.shape)
    deviation = np.abs(got - want)
    assert (deviation <= tol).all(), (name, key, "deviation", deviation.max(), "tolerance", tol.min(), got, want)


def _dos_tolerance(stats, bpd_tolerance, config):
    """How far float32 rounding of the statistics can move the density-of-states scores: the scores
    are recomputed (the reference refitted) with every level's bits/dim of every image (training,
    in and out) moved by its tolerance with random signs, three times; the tolerance is 4x the
    largest movement seen (per part). The score is a Gaussian-mixture density of standardised
    statistics, so its sensitivity depends on the fitted spread, which only a refit measures."""
    base = ood_values(*stats)
    worst = {"in": 0.0, "out": 0.0}
    rng = np.random.default_rng(0)
    for _ in range(3):
        moved = []
        for part in stats:
            part = dict(part)
            tol = bpd_tolerance(part)[:, None]
            part["level_bpd"] = part["level_bpd"] + tol * rng.choice([-1.0, 1.0], size=part["level_bpd"].shape)
            part["bpd"] = part["level_bpd"].sum(1)
            moved.append(part)
        shifted = ood_values(*moved)
        for side in worst:
            key = f"ood_{side}_dos"
            worst[side] = max(worst[side], float(np.abs(np.subtract(shifted[key], base[key])).max()))
    assert min(worst.values()) > 0  # the perturbation reached the scores
    return {side: 4 * value for side, value in worst.items()}


@pytest.mark.parametrize("name", sorted(KINDS))
def test_legacy_checkpoint_gives_the_same_numbers_and_pictures(name):
    with open(os.path.join(HERE, f"{name}_expected.json")) as f:
        expected = json.load(f)
    stored = np.load(os.path.join(HERE, f"{name}_pictures.npz"))
    keep = {}
    values, arrays = measure(os.path.join(HERE, f"{name}.pt"), KINDS[name]["size"], keep=keep)
    config = keep["model"].config
    assert set(values) == set(expected)
    n_bits, depth = expected["n_bits"], _depth(config)
    assert values["n_bits"] == n_bits
    dims = math.prod(config.image_shape)
    bits = dims * math.log(2)  # nats per bit/dim

    def nats_tolerance(log_prob, logdet):
        """A float32 log-density: depth roundings of its two terms, the log-det and the prior's."""
        log_prob, logdet = np.asarray(log_prob), np.asarray(logdet)
        return depth * EPS32 * (np.abs(logdet) + np.abs(log_prob - logdet))

    def bpd_tolerance_of(bpd, logdet):
        """bits/dim = (D n_bits ln 2 - log_prob) / (D ln 2): the log-density's tolerance in bits, and
        the rounding of the division."""
        log_prob = bits * (n_bits - np.asarray(bpd))
        return nats_tolerance(log_prob, logdet) / bits + depth * EPS32 * np.abs(bpd)

    logdet = np.asarray(expected["logdet"])
    _check(name, "logdet", values["logdet"], logdet, depth * EPS32 * np.abs(logdet))
    # the latents are rounded like the activations of every step; their norm sums D squares
    norms = np.asarray(expected["latent_norms"])
    _check(name, "latent_norms", values["latent_norms"], norms, depth * EPS32 * norms)
    for path in ("fast", "plain"):
        for key in (f"log_prob_{path}", f"log_prob_labels_{path}"):
            if key in expected:
                _check(name, key, values[key], expected[key], nats_tolerance(expected[key], logdet))
        key = f"bpd_{path}"
        _check(name, key, values[key], expected[key], bpd_tolerance_of(expected[key], logdet))

    # Outlier statistics and scores (float64 from the float32 per-level terms of other images: their
    # own log-dets, in the statistics). nll, complexity (minus the codec's exact bits), level bits/dim,
    # typicality (|bpd - training mean|) and hierarchy ratio (bpd - level 1) are each one or a
    # difference of two such numbers: twice the bits/dim tolerance.
    stats = keep["ood"]

    def bpd_tolerance(part):
        return bpd_tolerance_of(part["bpd"], part["logdet"])

    dos = _dos_tolerance(stats, bpd_tolerance, config)
    for side, part in zip(("in", "out"), stats[1:]):
        tol = 2 * bpd_tolerance(part)
        for key in sorted(k for k in expected if k.startswith(f"ood_{side}_")):
            if key.endswith("_codec_bpd"):  # a compressed file's size: exact
                assert values[key] == expected[key], key
            elif key.endswith("_dos"):
                _check(name, key, values[key], expected[key], dos[side])
            else:
                _check(name, key, values[key], expected[key], tol)

    # Pictures: a uint8 pixel is the float32 sample rounded to the model's n_bits grid, and a value
    # within the float32 error of a rounding boundary may round either way on another CPU. Such a
    # pixel moves by one step of the grid (2**(8 - n_bits) uint8 levels), never more. The float
    # error of a pixel, in grid steps, is at most about 2**n_bits * depth * eps * 4 (activations of
    # up to ~4: latents at temperature 0.7), so a fraction of at most twice that of the pixels sits
    # that close to a boundary; twice that many, plus 4 pixels for the tail of a small count, may
    # move. A changed layer or permutation moves most pixels, by many levels.
    step = 2 ** (8 - n_bits)
    near = 2 * (2**n_bits) * depth * EPS32 * 4
    assert set(arrays) == set(stored.files)
    for key in stored.files:
        got, want = arrays[key].astype(np.int64), stored[key].astype(np.int64)
        if key == "cli_samples_temperatures" and got.shape[1] > want.shape[1]:
            # the sheet gained a strip of row labels (T=...) on its left since these were stored;
            # the pictures to its right are what is compared
            got = got[:, got.shape[1] - want.shape[1] :]
        assert got.shape == want.shape, key
        moved = np.abs(got - want)
        assert moved.max() <= step, (key, moved.max())
        allowed = 2 * near * moved.size + 4
        assert (moved > 0).sum() <= allowed, (key, int((moved > 0).sum()), allowed)
