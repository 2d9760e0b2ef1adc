"""Outlier detection: metrics against hand-computed values, the scores' definitions and
orientation, the training-reference cache, and an end-to-end run on a briefly trained Glow."""

import copy
import hashlib
import io
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from glowflow import Glow, GlowConfig, GlowflowError, bits_per_dim, dequantize, ood, preprocess
from glowflow.data import load_dataset, make_loader
from glowflow.ood.cache import detector_cache_path_for
from glowflow.ood.codecs import _to_pil, codec_bits_per_dim, codec_description
from glowflow.ood.metrics import fpr_at_tpr
from glowflow.ood.reference import DOS_COMPONENTS, dos_features, load_reference, reference_key, save_reference
from glowflow.ood.report import file_slugs, format_summary
from glowflow.ood.statistics import ORIENTATION_TRANSFORMS, StatisticsSettings
from tests.helpers import randomised_model

# ----------------------------------------------------------------------------- metrics by hand


def test_metrics_perfect_separation_and_inversion():
    m = ood.outlier_metrics([0, 1, 2], [3, 4])
    assert m == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0.0}
    # Inverted: the outliers score lowest. Ranked high to low: 4 in, 3 in, 2 out, 1 out, 0 out.
    m = ood.outlier_metrics([3, 4], [0, 1, 2])
    assert m["auroc"] == 0.0
    # AUPR-out steps (recall 1/3 each) at precision 1/3, 2/4, 3/5
    assert m["aupr_out"] == pytest.approx((1 / 3) * (1 / 3 + 2 / 4 + 3 / 5), abs=1e-12)
    # AUPR-in, score negated: ranked 0 out, -1 out, -2 out, -3 in, -4 in -> recall 1/2 at P 1/4, 2/5
    assert m["aupr_in"] == pytest.approx(0.5 * 1 / 4 + 0.5 * 2 / 5, abs=1e-12)
    # all three outliers are caught only at threshold 0, where both in-distribution samples are flagged
    assert m["fpr95"] == 1.0


def test_metrics_with_ties_by_hand():
    s_in = [0.1, 0.4, 0.4, 0.7]
    s_out = [0.4, 0.7, 0.9]
    m = ood.outlier_metrics(s_in, s_out)
    # AUROC over 12 (out, in) pairs, a tie counting 1/2: 0.4 -> 1 + 2*0.5; 0.7 -> 3 + 0.5; 0.9 -> 4
    assert m["auroc"] == pytest.approx(9.5 / 12, abs=1e-12)
    # AUPR-out, thresholds 0.9 / 0.7 / 0.4: (P, R) = (1, 1/3), (2/3, 2/3), (3/6, 1)
    assert m["aupr_out"] == pytest.approx(1 / 3 * 1 + 1 / 3 * 2 / 3 + 1 / 3 * 1 / 2, abs=1e-12)
    # AUPR-in on -score, thresholds -0.1 / -0.4 / -0.7: (P, R) = (1, 1/4), (3/4, 3/4), (4/6, 1)
    assert m["aupr_in"] == pytest.approx(1 / 4 * 1 + 1 / 2 * 3 / 4 + 1 / 4 * 4 / 6, abs=1e-12)
    # 95% of 3 outliers = all 3 -> threshold 0.4; the in-distribution 0.4, 0.4, 0.7 are flagged (ties count)
    assert m["fpr95"] == 0.75


def test_fpr95_tie_rule_by_hand():
    # 20 outliers 1..20: 95% = 19 of them, so the threshold is the 19th largest, 2.
    out = np.arange(1, 21, dtype=float)
    assert fpr_at_tpr([0, 1, 2, 2, 3, 25], out) == pytest.approx(4 / 6)  # 2, 2, 3, 25 flagged
    assert fpr_at_tpr([0, 1, 1.999], out) == 0.0
    # Outliers tied at the threshold are all caught: 18 fives and two ones -> the 19th largest is 1,
    # the achieved TPR is 1, and every in-distribution score >= 1 is a false positive.
    out = np.array([5.0] * 18 + [1.0] * 2)
    assert fpr_at_tpr([0, 1, 1, 4], out) == 0.75
    # 10 outliers: ceil(9.5) = 10, the threshold is the smallest outlier score
    assert fpr_at_tpr([0.5, 1.0, 2.0], np.arange(1, 11, dtype=float)) == pytest.approx(2 / 3)
    # 40 outliers: exactly 38 (no float rounding up to 39)
    assert fpr_at_tpr([2.5, 3.0], np.arange(1, 41, dtype=float)) == 0.5  # threshold 3


def test_metrics_agree_with_a_roc_curve_on_tied_random_scores():
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(0)
    for _ in range(20):
        s_in = np.round(rng.normal(0, 1, 57), 1)
        s_out = np.round(rng.normal(1, 1, 43), 1)
        y = np.r_[np.zeros(57), np.ones(43)]
        fpr, tpr, _ = roc_curve(y, np.r_[s_in, s_out], drop_intermediate=False)
        expected = fpr[np.argmax(tpr >= 0.95)]
        m = ood.outlier_metrics(s_in, s_out)
        assert m["fpr95"] == pytest.approx(expected, abs=1e-12)
        # orientation: swapping the roles mirrors the AUROC
        assert m["auroc"] + ood.outlier_metrics(s_out, s_in)["auroc"] == pytest.approx(1.0, abs=1e-12)


def test_metrics_rank_non_finite_scores_as_outlying():
    with pytest.warns(RuntimeWarning, match="non-finite"):
        m = ood.outlier_metrics([0.0, 1.0, -np.inf], [np.nan, np.inf, 2.0])
    assert m["auroc"] == 1.0
    with pytest.warns(RuntimeWarning):  # a NaN in-distribution score outranks every finite outlier
        assert ood.outlier_metrics([np.nan, 0.0], [5.0])["auroc"] == 0.5
    with pytest.raises(GlowflowError):
        ood.outlier_metrics([], [1.0])


# ----------------------------------------------------------------------------- perturbation (Ren et al.)


def test_perturb_replaces_values_with_other_values_at_the_rate():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 32, 32), generator=g).float() / 255
    assert torch.equal(ood.perturb(images, 0.0, g), images)
    every = ood.perturb(images, 1.0, g)
    assert (torch.round(every * 255) != torch.round(images * 255)).all()  # always a different value
    p = ood.perturb(images, 0.25, torch.Generator().manual_seed(1))
    changed = torch.round(p * 255) != torch.round(images * 255)
    assert abs(changed.float().mean().item() - 0.25) < 0.01
    assert torch.equal(p * 255, torch.round(p * 255))  # stays on the 8-bit grid
    assert p.min() >= 0 and p.max() <= 1 and p.dtype == images.dtype and p.shape == images.shape
    # the substitutes are uniform over the other 255 values: the offsets cover 1..255 evenly
    offsets = ((torch.round(every * 255) - torch.round(images * 255)) % 256).long().flatten()
    counts = torch.bincount(offsets, minlength=256)
    assert counts[0] == 0 and (counts[1:] > 0).all()
    assert counts[1:].float().std() / counts[1:].float().mean() < 0.15
    # reproducible from the generator
    assert torch.equal(p, ood.perturb(images, 0.25, torch.Generator().manual_seed(1)))
    with pytest.raises(GlowflowError):
        ood.perturb(images, 1.5)


# ----------------------------------------------------------------------------- codec


def test_png_codec_counts_the_image_data_of_a_real_png():
    g = torch.Generator().manual_seed(0)
    constant = torch.full((1, 1, 16, 16), 0.5)
    ramp = (torch.arange(16.0).repeat(16, 1) * 16 / 255).view(1, 1, 16, 16)
    noise = torch.randint(0, 256, (1, 1, 16, 16), generator=g).float() / 255
    bpd = codec_bits_per_dim(torch.cat([constant, ramp, noise]), 8, "png")
    assert bpd[0] < bpd[1] < bpd[2] and bpd[2] > 7.5
    # the count is the IDAT payload: the whole file minus signature and chunk framing (57 bytes)
    buffer = io.BytesIO()
    Image.fromarray(np.round(noise[0, 0].numpy() * 255).astype(np.uint8)).save(
        buffer, format="PNG", optimize=True, compress_level=9
    )
    assert bpd[2] == 8 * (len(buffer.getvalue()) - 57) / 256
    # lossless, with the layouts for C = 1, 3 and other C
    for c in (1, 2, 3):
        img = (torch.randint(0, 256, (c, 8, 8), generator=g)).to(torch.uint8).numpy()
        decoded = np.asarray(Image.open(io.BytesIO(_encode(_to_pil(img)))))
        expected = img[0] if c == 1 else img.transpose(1, 2, 0) if c == 3 else img.reshape(-1, 8)
        assert np.array_equal(decoded, expected)
    assert "PNG" in codec_description("png") and "compress_level=9" in codec_description("png")


def _encode(pil):
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return buffer.getvalue()


def test_codec_sees_the_models_bit_depth_and_webp_works():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (3, 3, 8, 8), generator=g).float() / 255
    five_bit = torch.floor(torch.round(images * 255) / 8) / 255  # the 5-bit integers as 8-bit samples
    assert np.array_equal(codec_bits_per_dim(images, 5, "png"), codec_bits_per_dim(five_bit, 8, "png"))
    webp = codec_bits_per_dim(torch.cat([torch.full((1, 3, 8, 8), 0.2), images]), 8, "webp")
    assert webp[0] < webp[1] and "WebP lossless" in codec_description("webp")
    with pytest.raises(GlowflowError):
        codec_bits_per_dim(images, 8, "jpeg")


# ----------------------------------------------------------------------------- statistics of a model


COMBO = dict(flow_permutation="invconv", flow_coupling="affine", LU_decomposed=False, learn_top=True, y_condition=False)


def _loader(images, batch_size=4):
    return DataLoader(TensorDataset(images, torch.zeros(len(images))), batch_size=batch_size, shuffle=False)


def test_statistics_levels_sum_to_bits_per_dim_and_match_the_model():
    shape = (1, 8, 8)
    model = randomised_model(shape, 3, dict(COMBO, n_bits=5), K=2, hidden=8)  # float64, 5-bit
    images = torch.randint(0, 256, (10, *shape), generator=torch.Generator().manual_seed(0)).float() / 255
    model.train()
    stats = ood.compute_statistics(model, _loader(images), n_bits=5, seed=3, codec=None, progress=False)
    assert model.training  # the training flag is restored
    assert set(stats) == {"bpd", "level_bpd", "logdet", "latent_rms", "top_latent", "labels"}
    assert stats["level_bpd"].shape == (10, 3) and stats["latent_rms"].shape == (10, 3)
    assert stats["labels"].tolist() == [-1] * 10  # float labels are not classes
    np.testing.assert_allclose(stats["level_bpd"].sum(1), stats["bpd"], rtol=0, atol=1e-10)
    # the same numbers the model gives with the same noise (drawn batch by batch from seed 3)
    g = torch.Generator().manual_seed(3)
    x = torch.cat([dequantize(preprocess(b, 5), 5, g) for b in images.split(4)]).double()
    model.eval()
    with torch.no_grad():
        expected = bits_per_dim(model.log_prob(x), 64, 5)
        latents, logdet = model.encode(x)
    np.testing.assert_allclose(stats["bpd"], expected.numpy(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(stats["logdet"], logdet.numpy(), rtol=0, atol=1e-9)
    rms = np.stack([z.flatten(1).pow(2).mean(1).sqrt().numpy() for z in latents], 1)
    np.testing.assert_allclose(stats["latent_rms"], rms, rtol=1e-12)
    assert stats["top_latent"].dtype == np.float32
    np.testing.assert_allclose(stats["top_latent"], latents[-1].flatten(1).float().numpy(), rtol=1e-6)
    # level i: -(log prior_i + logdet_i) plus its share of the discretisation constant
    terms = model.forward_terms(x)
    for i, d_i in enumerate(int(np.prod(s)) for s in model.latent_shapes):
        level = (-(terms.level_log_priors[i] + terms.level_logdets[i]) + d_i * 5 * math.log(2)) / (64 * math.log(2))
        np.testing.assert_allclose(stats["level_bpd"][:, i], level.detach().numpy(), rtol=0, atol=1e-10)
    # deterministic; max_images; bare-tensor batches
    again = ood.compute_statistics(model, _loader(images), 5, seed=3, codec=None, progress=False)
    assert np.array_equal(again["bpd"], stats["bpd"])
    # n_bits defaults to the model's own, and any other is refused
    default = ood.compute_statistics(model, _loader(images), seed=3, codec=None, progress=False)
    assert np.array_equal(default["level_bpd"], stats["level_bpd"])
    with pytest.raises(GlowflowError, match="5-bit"):
        ood.compute_statistics(model, _loader(images), 8, progress=False)
    capped = ood.compute_statistics(
        model, [images[:4], images[4:8], images[8:]], 5, seed=3, max_images=6, codec="png", progress=False
    )
    assert capped["bpd"].shape == (6,) and capped["codec_bpd"].shape == (6,)
    np.testing.assert_allclose(capped["bpd"], stats["bpd"][:6], rtol=0, atol=1e-10)
    # a class-conditional model is scored with its class-marginal prior (labels are ignored)
    conditional = randomised_model(shape, 2, dict(COMBO, y_condition=True), K=1, hidden=4)
    cstats = ood.compute_statistics(conditional, _loader(images), 8, codec=None, progress=False)
    g8 = torch.Generator().manual_seed(0)  # compute_statistics' default seed
    x8 = torch.cat([dequantize(preprocess(b, 8), 8, g8) for b in images.split(4)]).double()
    with torch.no_grad():
        np.testing.assert_allclose(cstats["bpd"], conditional.bits_per_dim(x8).numpy(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(cstats["level_bpd"].sum(1), cstats["bpd"], rtol=0, atol=1e-10)


def test_statistics_reject_bad_inputs():
    model = randomised_model((1, 8, 8), 2, COMBO)
    with pytest.raises(GlowflowError, match="shape"):
        ood.compute_statistics(model, _loader(torch.rand(4, 3, 8, 8)), 8, progress=False)
    with pytest.raises(GlowflowError, match=r"\[0, 1\]"):
        ood.compute_statistics(model, _loader(torch.rand(4, 1, 8, 8) * 255), 8, progress=False)
    with pytest.raises(GlowflowError, match="no images"):
        ood.compute_statistics(model, [], 8, progress=False)
    fresh = Glow(GlowConfig(image_shape=(1, 8, 8), hidden_channels=4, K=1, L=2))
    with pytest.raises(GlowflowError, match="initialised"):
        ood.compute_statistics(fresh, _loader(torch.rand(4, 1, 8, 8)), 8, progress=False)


def test_scores_definitions_on_given_statistics():
    stats = {
        "bpd": np.array([3.0, 5.0]),
        "level_bpd": np.array([[1.0, 1.5, 0.5], [2.0, 2.0, 1.0]]),
        "logdet": np.array([10.0, 12.0]),
        "latent_rms": np.ones((2, 3)),
        "codec_bpd": np.array([4.0, 4.5]),
    }
    rng = np.random.default_rng(0)
    level_bpd = rng.normal([1.5, 2.0, 0.5], 0.2, (60, 3))
    level_bpd[:, 2] = 0.5  # a constant statistic keeps std 1
    train = {
        "bpd": level_bpd.sum(1),
        "level_bpd": level_bpd,
        "logdet": rng.normal(11, 1, 60),
        "latent_rms": rng.normal(1, 0.1, (60, 3)),
    }
    ref = ood.fit_reference(train)
    assert ref.bpd_mean == pytest.approx(train["bpd"].mean(), abs=1e-12)
    typical = np.abs(stats["bpd"] - train["bpd"].mean())
    s = ood.outlier_scores(stats, ref, background_stats={"bpd": np.array([2.5, 6.0])})
    assert list(s) == [
        "nll",
        "complexity",
        "typicality",
        "level_1_bpd",
        "level_2_bpd",
        "level_3_bpd",
        "hierarchy_ratio",
        "dos",
        "combined",
        "likelihood_ratio",
    ]
    np.testing.assert_array_equal(s["combined"], s["dos"])  # no orientation part, no classifier
    np.testing.assert_array_equal(s["nll"], [3.0, 5.0])
    np.testing.assert_array_equal(s["complexity"], [-1.0, 0.5])
    np.testing.assert_allclose(s["typicality"], typical, rtol=1e-12)
    np.testing.assert_array_equal(s["level_2_bpd"], [1.5, 2.0])
    np.testing.assert_array_equal(s["hierarchy_ratio"], [2.0, 3.0])  # levels 2 + 3
    np.testing.assert_array_equal(s["likelihood_ratio"], [0.5, -1.0])
    # dos: minus the log-density of the standardised statistics under a full-covariance Gaussian
    # mixture fitted on the training statistics (checked against scikit-learn's own evaluation)
    from sklearn.mixture import GaussianMixture

    names, train_m = dos_features(train)
    assert names == ["level_1_bpd", "level_2_bpd", "level_3_bpd"]
    _, test_m = dos_features(stats)
    test_m = test_m[:, :-1]  # the stats' codec_bpd: ignored by a reference fitted without it
    mean, std = train_m.mean(0), train_m.std(0)
    std[std < 1e-9] = 1
    assert len(ref.dos_log_weights) == DOS_COMPONENTS == 4  # 60 images would allow 60 // (2 * 3 + 2) = 7
    mixture = GaussianMixture(4, covariance_type="full", reg_covar=1e-6, random_state=0)
    mixture.fit((train_m - mean) / std)
    np.testing.assert_allclose(s["dos"], -mixture.score_samples((test_m - mean) / std), rtol=1e-8)
    # one level: no hierarchy ratio; no codec or background: no complexity or likelihood ratio
    one = {k: (v[:, :1] if v.ndim == 2 else v) for k, v in stats.items() if k != "codec_bpd"}
    one_train = {k: (v[:, :1] if np.ndim(v) == 2 else v) for k, v in train.items()}
    assert list(ood.outlier_scores(one, ood.fit_reference(one_train))) == [
        "nll",
        "typicality",
        "level_1_bpd",
        "dos",
        "combined",
    ]
    with pytest.raises(GlowflowError, match="levels"):
        ood.outlier_scores(one, ref)
    # a reference fitted with the codec's bits has them as its last statistic, and then needs them
    train["codec_bpd"] = rng.normal(4.0, 0.3, 60)
    ref_codec = ood.fit_reference(train)
    names, train_m = dos_features(train)
    assert names[-1] == "codec_bpd" and ref_codec.dos_features == tuple(names) and train_m.shape == (60, 4)
    _, test_m = dos_features(stats)
    mean, std = train_m.mean(0), train_m.std(0)
    std[std < 1e-9] = 1
    mixture = GaussianMixture(len(ref_codec.dos_log_weights), covariance_type="full", reg_covar=1e-6, random_state=0)
    mixture.fit((train_m - mean) / std)
    np.testing.assert_allclose(
        ood.outlier_scores(stats, ref_codec)["dos"], -mixture.score_samples((test_m - mean) / std), rtol=1e-8
    )
    with pytest.raises(GlowflowError, match="codec"):
        ood.outlier_scores({k: v for k, v in stats.items() if k != "codec_bpd"}, ref_codec)


def test_reference_round_trip_without_pickle(tmp_path):
    rng = np.random.default_rng(0)
    train = {
        "bpd": rng.normal(3, 0.2, 50),
        "level_bpd": rng.normal(1, 0.1, (50, 2)),
        "logdet": rng.normal(0, 1, 50),
        "latent_rms": rng.normal(1, 0.1, (50, 2)),
        "top_latent": rng.normal(0, 1, (50, 3)).astype(np.float32),
        "labels": np.repeat([0, 1], 25),
    }
    ref = ood.fit_reference(train, key="k1", max_dos_points=40, components=8)  # capped at 40 // (2 * 3 + 2)
    assert ref.dos_features == ("level_1_bpd", "level_2_bpd", "top_gaussian")
    assert ref.dos_means.shape == (5, 3) and ref.dos_precision_cholesky.shape == (5, 3, 3) and ref.n_train == 50
    assert ref.latent.classes.tolist() == [0, 1] and ref.latent.precision_cholesky.shape == (2, 3, 3)
    path = tmp_path / "ref.npz"
    save_reference(str(path), ref)
    assert os.listdir(tmp_path) == ["ref.npz"]  # no temporary left behind
    with np.load(path, allow_pickle=False) as data:  # plain arrays only
        assert str(data["key"]) == "k1"
    back = load_reference(str(path))
    for field in ("key", "num_levels", "n_train", "bpd_mean", "bpd_std", "dos_features"):
        assert getattr(back, field) == getattr(ref, field)
    for field in ("dos_mean", "dos_std", "dos_log_weights", "dos_means", "dos_precision_cholesky"):
        assert np.array_equal(getattr(back, field), getattr(ref, field))
    for field in ("classes", "means", "precision_cholesky"):
        assert np.array_equal(getattr(back.latent, field), getattr(ref.latent, field))
    np.testing.assert_array_equal(ood.outlier_scores(train, back)["dos"], ood.outlier_scores(train, ref)["dos"])
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(GlowflowError, match="cannot read"):
        load_reference(str(tmp_path / "bad.npz"))
    with pytest.raises(GlowflowError, match="no outlier reference"):
        load_reference(str(tmp_path / "missing.npz"))


def test_reference_key_follows_the_checkpoint_and_settings(tmp_path):
    model = randomised_model((1, 8, 8), 2, COMBO)
    key = reference_key(model, 8, "mnist")
    assert key == reference_key(copy.deepcopy(model), 8, "mnist")
    changed = copy.deepcopy(model)
    with torch.no_grad():
        next(changed.parameters()).view(-1)[0] += 1e-6
    assert reference_key(changed, 8, "mnist") != key
    assert reference_key(model, 5, "mnist") != key
    assert reference_key(model, 8, "fashionmnist") != key
    assert reference_key(model, 8, "mnist", max_images=100) != key
    assert reference_key(model, 8, "mnist", codec="webp") != key
    assert reference_key(model, 8, "mnist", codec=None) != key
    assert reference_key(model, 8, "mnist", threshold_fraction=0.2) != key
    assert reference_key(model, 8, "mnist", transforms=("vflip",)) != key
    assert detector_cache_path_for("/runs/a/glow.pt", "mnist", 8) == "/runs/a/glow.ood_detector_mnist_8bit.npz"


# ----------------------------------------------------------------------------- end to end on a trained Glow

SHAPE = (1, 8, 8)


def smooth_images(n, g):
    """Smooth 8x8 images: a random linear gradient plus a Gaussian bump, on the 8-bit grid."""
    u = torch.linspace(-1, 1, SHAPE[1])
    yy, xx = torch.meshgrid(u, u, indexing="ij")
    angle = torch.rand(n, 1, 1, generator=g) * 2 * math.pi
    slope = 0.1 + 0.25 * torch.rand(n, 1, 1, generator=g)
    img = 0.5 + slope * (torch.cos(angle) * xx + torch.sin(angle) * yy)
    cx, cy = torch.rand(2, n, 1, 1, generator=g) * 1.6 - 0.8
    width = 0.3 + 0.4 * torch.rand(n, 1, 1, generator=g)
    height = (torch.rand(n, 1, 1, generator=g) - 0.5) * 0.6
    img = img + height * torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * width**2))
    return (torch.round(img.clamp(0, 1) * 255) / 255).unsqueeze(1)


def noise_images(n, g):
    return torch.randint(0, 256, (n, *SHAPE), generator=g).float() / 255


def train_glow(data, steps=100, perturb_rate=None, seed=0):
    """The little training loop: Adamax 1e-3, batches of 64, dequantised bits/dim."""
    torch.manual_seed(seed)
    model = Glow(GlowConfig(image_shape=SHAPE, hidden_channels=8, K=2, L=2))
    g = torch.Generator().manual_seed(seed + 1)
    model.initialize(dequantize(preprocess(data[:256], 8), 8, g))
    opt = torch.optim.Adamax(model.parameters(), lr=1e-3)
    for _ in range(steps):
        x = data[torch.randint(0, len(data), (64,), generator=g)]
        if perturb_rate:
            x = ood.perturb(x, perturb_rate, g)
        loss = bits_per_dim(model.log_prob(dequantize(preprocess(x, 8), 8, g)), 64, 8).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained():
    g = torch.Generator().manual_seed(0)
    data = dict(
        train=smooth_images(1024, g),
        test=smooth_images(200, g),
        noise=noise_images(200, g),
        noise2=noise_images(100, g),
    )
    model = train_glow(data["train"])
    background = train_glow(data["train"], perturb_rate=0.3, seed=5)  # Ren et al.'s recipe
    return model, background, data


def test_every_score_separates_noise_from_smooth_images_in_the_right_direction(trained):
    model, background, data = trained
    ref = ood.fit_reference(ood.compute_statistics(model, _loader(data["train"], 256), 8, codec=None, progress=False))
    sets = {}
    for name in ("test", "noise"):
        stats = ood.compute_statistics(model, _loader(data[name], 64), 8, progress=False)
        bg = ood.compute_statistics(background, _loader(data[name], 64), 8, codec=None, progress=False)
        sets[name] = ood.outlier_scores(stats, ref, bg)
    names = list(sets["test"])
    assert names == [
        "nll",
        "complexity",
        "typicality",
        "level_1_bpd",
        "level_2_bpd",
        "hierarchy_ratio",
        "top_gaussian",
        "dos",
        "combined",
        "likelihood_ratio",
    ]
    for name in names:
        m = ood.outlier_metrics(sets["test"][name], sets["noise"][name])
        assert m["auroc"] > 0.9, (name, m)
        assert m["aupr_in"] > 0.9 and m["aupr_out"] > 0.9 and m["fpr95"] < 0.5, (name, m)
        # higher = more outlying: the outliers' median score is above the inliers'
        assert np.median(sets["noise"][name]) > np.median(sets["test"][name]), name


def test_run_outlier_detection_writes_reports_figures_and_reuses_the_cache(trained, tmp_path, capsys):
    model, background, data = trained
    cache = str(tmp_path / "ckpt" / "glow.ood_detector_smooth_8bit.npz")
    out_dir = str(tmp_path / "out")
    outs = {"noise": _loader(data["noise"], 64), "more/noise2": _loader(data["noise2"], 64)}
    settings = ood.OutlierDetectionSettings(
        output_dir=out_dir,
        in_name="smooth",
        reference_cache_path=cache,
        statistics=StatisticsSettings(progress=False),
    )
    kwargs = dict(
        model=model,
        in_test_loader=_loader(data["test"], 64),
        out_loaders=outs,
        settings=settings,
        background_model=background,
    )
    reports = ood.run_outlier_detection(train_loader=_loader(data["train"], 256), **kwargs)
    printed = capsys.readouterr().out
    assert set(reports) == {"noise", "more/noise2"}
    every = {
        "nll",
        "complexity",
        "typicality",
        "level_1_bpd",
        "level_2_bpd",
        "hierarchy_ratio",
        "top_gaussian",
        "dos",
        "orientation",
        "dos_orientation",
        "combined",
        "likelihood_ratio",
    }
    for out_name, stem in (("noise", "ood_smooth_vs_noise"), ("more/noise2", "ood_smooth_vs_noise2")):
        path = os.path.join(out_dir, stem + ".json")
        with open(path) as f:
            report = json.load(f)
        assert report == reports[out_name]
        assert set(report["scores"]) == every
        for name, m in report["scores"].items():
            assert set(m) == {"auroc", "aupr_in", "aupr_out", "fpr95"}
            # orientation compares an image with itself turned over: noise has no orientation, so
            # that score alone is not a noise detector (its combination with dos is)
            assert all(0.0 <= v <= 1.0 for v in m.values()) and (m["auroc"] > 0.9 or name == "orientation")
        assert report["in_dataset"] == "smooth" and report["out_dataset"] == out_name
        assert report["n_in"] == 200 and report["n_out"] == len(data[out_name.split("/")[-1]])
        assert report["bits_per_dim"]["out"] > report["bits_per_dim"]["in"]
        assert "PNG" in report["codec"] and set(report["background_bits_per_dim"]) == {"in", "out"}
        # the detector fits on the 1024 training images, a fifth (205) held back for its threshold
        assert report["reference"]["n_train"] == 819 and report["reference"]["reused_cache"] is False
        assert report["reference"]["n_threshold"] == 205
        decisions = report["detector"]
        assert decisions["score"] == "combined" and decisions["tpr_target"] == 0.95
        assert 0.85 < decisions["in_kept"] <= 1.0 and decisions["out_flagged"] > 0.9
        for kind in ("histograms", "roc"):
            png = os.path.join(out_dir, f"{stem}_{kind}.png")
            assert report["files"][kind] == png and png in printed
            with Image.open(png) as im:
                assert im.format == "PNG" and im.size[0] > 300
        assert path in printed
    assert "AUROC" in printed and "likelihood_ratio" in printed and f"wrote {cache}" in printed
    assert os.path.exists(cache)

    # reused: no training images needed, identical numbers
    mtime = os.stat(cache).st_mtime_ns
    again = ood.run_outlier_detection(train_loader=None, **kwargs)
    assert "reusing" in capsys.readouterr().out and os.stat(cache).st_mtime_ns == mtime
    assert again["noise"]["reference"]["reused_cache"] is True
    assert again["noise"]["scores"] == reports["noise"]["scores"]

    # invalidated by a changed checkpoint: without the training images it refuses, with them it recomputes
    changed = copy.deepcopy(model)
    with torch.no_grad():
        next(changed.parameters()).add_(0.01)
    kwargs.update(model=changed, out_loaders={"noise": outs["noise"]})
    with pytest.raises(GlowflowError, match="training images"):
        ood.run_outlier_detection(train_loader=None, **kwargs)
    third = ood.run_outlier_detection(train_loader=_loader(data["train"], 256), **kwargs)
    assert "another checkpoint" in capsys.readouterr().out
    assert third["noise"]["reference"]["reused_cache"] is False
    key = reference_key(changed, 8, "smooth", 0, 10_000, "png", 0.2, ORIENTATION_TRANSFORMS)
    assert load_reference(cache).key == key
    # a background model at another bit depth is refused before anything is computed
    five_bit = Glow(GlowConfig(image_shape=SHAPE, hidden_channels=8, K=2, L=2, n_bits=5))
    with pytest.raises(GlowflowError, match="same bit depth"):
        ood.run_outlier_detection(train_loader=None, **dict(kwargs, background_model=five_bit))


def test_outlier_sets_with_one_file_name_get_their_own_reports(trained, tmp_path, capsys):
    """d1/set.npz and d2/set.npz: two reports, each its own files, the summary pointing at each."""
    model, _, data = trained
    paths = {}
    for folder, key in (("d1", "noise"), ("d2", "noise2")):
        (tmp_path / folder).mkdir()
        paths[key] = str(tmp_path / folder / "set.npz")
        pixels = (data[key][:, 0] * 255).round().to(torch.uint8).numpy()
        np.savez(paths[key], images=pixels)
    out_dir = tmp_path / "out"
    settings = ood.OutlierDetectionSettings(
        output_dir=str(out_dir), in_name="smooth", statistics=StatisticsSettings(progress=False)
    )
    loaders = {path: make_loader(load_dataset(path, "all"), batch_size=64, shuffle=False) for path in paths.values()}
    reports = ood.run_outlier_detection(
        model, _loader(data["test"], 64), _loader(data["train"], 256), loaders, settings
    )
    capsys.readouterr()
    assert set(reports) == set(paths.values())
    written = {}
    for key, folder in (("noise", "d1"), ("noise2", "d2")):
        report = reports[paths[key]]
        assert report["out_dataset"] == paths[key] and report["n_out"] == len(data[key])
        stem = str(out_dir / f"ood_smooth_vs_set_{folder}")
        assert report["files"] == {
            "json": stem + ".json",
            "histograms": stem + "_histograms.png",
            "roc": stem + "_roc.png",
        }
        with open(report["files"]["json"]) as f:
            written[key] = json.load(f)
        assert written[key] == report
        assert all(os.path.isfile(path) for path in report["files"].values())
    assert written["noise"]["n_out"] == 200 and written["noise2"]["n_out"] == 100
    with open(out_dir / "ood_smooth_summary.json") as f:
        summary = json.load(f)
    assert summary["reports"] == {paths[k]: reports[paths[k]]["files"]["json"] for k in ("noise", "noise2")}
    assert summary["auroc"] == {
        paths[k]: {name: m["auroc"] for name, m in reports[paths[k]]["scores"].items()} for k in ("noise", "noise2")
    }
    assert sorted(p.name for p in out_dir.glob("*.json")) == [
        "ood_smooth_summary.json",
        "ood_smooth_vs_set_d1.json",
        "ood_smooth_vs_set_d2.json",
    ]


def test_file_slugs_are_unique_and_plain_where_names_do_not_collide():
    assert file_slugs("cifar10", ["svhn", "/data/my_set.npz"]) == (
        "cifar10",
        {"svhn": "svhn", "/data/my_set.npz": "my_set"},
    )
    assert file_slugs("cifar10", ["cifar10"]) == ("cifar10", {"cifar10": "cifar10"})  # the same set: one name
    in_slug, outs = file_slugs("a/set.npz", ["b/set.npz", "x/c/set.npz", "y/c/set.npz", "set_b", "mnist"])
    assert in_slug == "set_a" and outs["set_b"] == "set_b" and outs["mnist"] == "mnist"
    assert outs["x/c/set.npz"] == "set_c"  # the first with parent c; the second's parent collides

    def hashed(name):
        return "set_" + hashlib.sha1(name.encode()).hexdigest()[:8]

    assert outs["y/c/set.npz"] == hashed("y/c/set.npz")
    assert outs["b/set.npz"] == hashed("b/set.npz")  # set_b is another set's name
    slugs = [in_slug, *outs.values()]
    assert len(set(slugs)) == len(slugs), slugs
    # names that differ only in spelling still get distinct slugs
    _, outs = file_slugs("in", ["d/set.npz", "./d/set.npz", "d//set.npz"])
    assert outs == {"d/set.npz": "set_d", "./d/set.npz": hashed("./d/set.npz"), "d//set.npz": hashed("d//set.npz")}


def test_summary_table_marks_each_sets_best_score():
    def report(out, aurocs):
        return {
            "in_dataset": "fmnist",
            "out_dataset": out,
            "bits_per_dim": {"in": 3.5, "out": 2.8},
            "scores": {k: {"auroc": v} for k, v in aurocs.items()},
        }

    table = format_summary(
        {"mnist": report("mnist", {"nll": 0.2, "dos": 0.98}), "noise": report("noise", {"nll": 1.0, "dos": None})}
    )
    lines = table.splitlines()
    assert lines[0] == "AUROC, fmnist (in) against each outlier set"
    assert lines[1].split() == ["score", "mnist", "noise"]
    assert lines[2].split() == ["nll", "0.2000", "1.0000*"] and lines[3].split() == ["dos", "0.9800*", "-"]
    assert lines[4].split()[-2:] == ["3.50/2.80", "3.50/2.80"]


def test_dos_statistics_can_be_chosen_by_group():
    stats = {
        "bpd": np.full(4, 3.0),
        "level_bpd": np.arange(8.0).reshape(4, 2),
        "logdet": np.arange(4.0),
        "latent_rms": np.ones((4, 2)),
        "codec_bpd": np.full(4, 4.0),
    }
    assert dos_features(stats)[0] == ["level_1_bpd", "level_2_bpd", "codec_bpd"]
    names, matrix = dos_features(stats, ("codec_bpd", "latent_rms", "logdet", "level_bpd"))
    assert names == ["level_1_bpd", "level_2_bpd", "logdet", "latent_rms_1", "latent_rms_2", "codec_bpd"]
    np.testing.assert_array_equal(matrix[:, 2], np.arange(4.0))
    np.testing.assert_array_equal(matrix[:, :2], stats["level_bpd"])
    no_codec = {k: v for k, v in stats.items() if k != "codec_bpd"}
    assert dos_features(no_codec)[0] == ["level_1_bpd", "level_2_bpd"]
    with pytest.raises(GlowflowError, match="unknown density-of-states statistic 'norms'"):
        dos_features(stats, ("norms",))
    with pytest.raises(GlowflowError, match="none of"):
        dos_features(no_codec, ("codec_bpd",))
    rng = np.random.default_rng(1)
    train = {
        "bpd": rng.normal(3, 0.2, 80),
        "level_bpd": rng.normal(1, 0.1, (80, 2)),
        "logdet": rng.normal(0, 1, 80),
        "latent_rms": rng.normal(1, 0.1, (80, 2)),
    }
    ref = ood.fit_reference(train, statistics=("logdet",))
    assert ref.dos_features == ("logdet",)
    far = dict(train, logdet=train["logdet"] + 100.0)  # only the chosen statistic moves: dos sees it
    assert ood.outlier_scores(far, ref)["dos"].min() > ood.outlier_scores(train, ref)["dos"].max()


def test_an_outlier_file_without_splits_is_scored_whole(tmp_path):
    """An outlier .npz without a test split of its own contributes every image, not a held-out tenth."""
    from glowflow.cli import main
    from tests.helpers import write_noise_npz, write_smooth_npz

    data = write_smooth_npz(tmp_path / "smooth.npz", n=64, size=16)
    noise = write_noise_npz(tmp_path / "noise.npz", n=40, size=16)
    # a copy: the command caches its detector beside the checkpoint, and tests/legacy/ stays as committed
    checkpoint = str(tmp_path / "model.pt")
    shutil.copy(os.path.join(os.path.dirname(__file__), "..", "legacy", "cond_lu_shuffle_additive_5bit.pt"), checkpoint)
    out = tmp_path / "ood"
    code = main(
        [
            "--outlier_detection",
            "--checkpoint",
            checkpoint,
            "--dataset",
            data,
            "--out_dataset",
            noise,
            "--output_dir",
            str(out),
            "--fit_images",
            "0",
        ]
    )
    assert code == 0
    report = json.loads((out / "ood_smooth_vs_noise.json").read_text())
    assert report["n_out"] == 40


def test_statistics_pass_integer_class_labels_through():
    shape = (1, 8, 8)
    model = randomised_model(shape, 2, COMBO, K=1, hidden=4)
    images = torch.rand(6, *shape).mul(255).round().div(255)
    labels = torch.tensor([3, 0, 1, 3, 2, 0])
    loader = DataLoader(TensorDataset(images, labels), batch_size=4)
    assert ood.compute_statistics(model, loader, 8, codec=None, progress=False)["labels"].tolist() == labels.tolist()
    column = DataLoader(TensorDataset(images, labels[:, None]), batch_size=4)
    assert ood.compute_statistics(model, column, 8, codec=None, progress=False)["labels"].tolist() == labels.tolist()
    multi = DataLoader(TensorDataset(images, torch.ones(6, 3, dtype=torch.long)), batch_size=4)
    assert ood.compute_statistics(model, multi, 8, codec=None, progress=False)["labels"].tolist() == [-1] * 6
    bare = ood.compute_statistics(model, [images], 8, codec=None, progress=False)
    assert bare["labels"].tolist() == [-1] * 6


def test_latent_features_pool_a_large_top_latent_to_at_most_the_cap():
    from glowflow.ood.statistics import MAX_LATENT_FEATURES, latent_features

    small = torch.randn(2, 16, 4, 4)
    assert torch.equal(latent_features(small), small.reshape(2, -1))
    big = torch.randn(2, 48, 16, 16)  # 12288 features -> pooled twice to 48 x 4 x 4 = 768
    pooled = latent_features(big)
    assert pooled.shape == (2, 768) and pooled.shape[1] <= MAX_LATENT_FEATURES
    torch.testing.assert_close(pooled, torch.nn.functional.avg_pool2d(big, 4).reshape(2, -1))


def test_top_gaussian_is_the_nearest_class_gaussian_negative_log_density():
    from scipy.stats import multivariate_normal

    from glowflow.ood.reference import LATENT_SHRINKAGE, fit_latent_gaussians, top_gaussian_nll

    rng = np.random.default_rng(0)
    f = 5
    centres = np.array([np.zeros(f), np.full(f, 4.0)])
    labels = np.repeat([0, 1], 200)
    features = centres[labels] + rng.normal(size=(400, f)) * np.array([1.0, 2.0, 0.5, 1.0, 1.0])
    latent = fit_latent_gaussians(features, labels)
    assert latent.classes.tolist() == [0, 1]
    queries = rng.normal(size=(7, f)) * 3
    expected = []
    for c in (0, 1):
        members = features[labels == c]
        cov = np.cov(members.T, bias=True)
        cov += LATENT_SHRINKAGE * np.mean(np.diag(cov)) * np.eye(f)
        expected.append(multivariate_normal(members.mean(0), cov).logpdf(queries))
    want = -np.max(expected, 0) / f
    np.testing.assert_allclose(top_gaussian_nll(latent, queries), want, rtol=1e-5)
    # unlabelled images (or one class) give one Gaussian over all of them
    single = fit_latent_gaussians(features, np.full(400, -1))
    assert single.classes.tolist() == [-1] and single.means.shape == (1, f)
    assert fit_latent_gaussians(features, None).classes.tolist() == [-1]
    # a class with a single image gets no Gaussian of its own
    odd = labels.copy()
    odd[0] = 7
    assert fit_latent_gaussians(features, odd).classes.tolist() == [0, 1]
    with pytest.raises(GlowflowError, match="top-latent features"):
        top_gaussian_nll(latent, queries[:, :3])


def test_orientation_transforms_reach_the_detector_of_both_commands(trained):
    """--orientation_transforms (RunConfig.orientation_transforms) sets the transforms the
    detector of --outlier_detection and --score compares images with; none turns the orientation
    score off and the default score becomes dos; the names are glowflow.ood.statistics.TRANSFORMS'."""
    from glowflow.config import IMAGE_TRANSFORMS, RunConfig
    from glowflow.ood.command import command_settings
    from glowflow.ood.statistics import TRANSFORMS

    model = trained[0]
    assert tuple(TRANSFORMS) == IMAGE_TRANSFORMS
    default = command_settings(RunConfig(checkpoint="/runs/a.pt"), "smooth", 8, "cpu", "/tmp/out").detector(model)
    assert default.settings.transforms == ORIENTATION_TRANSFORMS and default.score == "combined"
    off = command_settings(RunConfig(checkpoint="/runs/a.pt", orientation_transforms=()), "smooth", 8, "cpu", "/o")
    assert off.statistics.transforms == () and off.detector(model).score == "combined"
    assert "orientation" not in off.detector(model).score_names()
    turned = RunConfig(checkpoint="/runs/a.pt", orientation_transforms=("rot180",))
    assert command_settings(turned, "smooth", 8, "cpu", "/o").detector(model).settings.transforms == ("rot180",)
    with pytest.raises(GlowflowError, match="orientation_transforms"):
        RunConfig(orientation_transforms=("spin",)).validate()
