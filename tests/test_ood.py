"""Outlier detection: metrics against hand-computed values, the scores' definitions and
orientation, the training-reference cache, and an end-to-end run on a briefly trained Glow."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from glowflow import GlowflowError
from glowflow import ood


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is fastest, and the machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    assert ood.fpr_at_tpr([0, 1, 2, 2, 3, 25], out) == pytest.approx(4 / 6)    # 2, 2, 3, 25 flagged
    assert ood.fpr_at_tpr([0, 1, 1.999], out) == 0.0
    # Outliers tied at the threshold are all caught: 18 fives and two ones -> the 19th largest is 1,
    # the achieved TPR is 1, and every in-distribution score >= 1 is a false positive.
    out = np.array([5.0] * 18 + [1.0] * 2)
    assert ood.fpr_at_tpr([0, 1, 1, 4], out) == 0.75
    # 10 outliers: ceil(9.5) = 10, the threshold is the smallest outlier score
    assert ood.fpr_at_tpr([0.5, 1.0, 2.0], np.arange(1, 11, dtype=float)) == pytest.approx(2 / 3)
    # 40 outliers: exactly 38 (no float rounding up to 39)
    assert ood.fpr_at_tpr([2.5, 3.0], np.arange(1, 41, dtype=float)) == 0.5   # threshold 3


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
    with pytest.warns(RuntimeWarning):     # a NaN in-distribution score outranks every finite outlier
        assert ood.outlier_metrics([np.nan, 0.0], [5.0])["auroc"] == 0.5
    with pytest.raises(GlowflowError):
        ood.outlier_metrics([], [1.0])


# ----------------------------------------------------------------------------- perturbation (Ren et al.)


def test_perturb_replaces_values_with_other_values_at_the_rate():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 32, 32), generator=g).float() / 255
    assert torch.equal(ood.perturb(images, 0.0, g), images)
    every = ood.perturb(images, 1.0, g)
    assert (torch.round(every * 255) != torch.round(images * 255)).all()   # always a different value
    p = ood.perturb(images, 0.25, torch.Generator().manual_seed(1))
    changed = torch.round(p * 255) != torch.round(images * 255)
    assert abs(changed.float().mean().item() - 0.25) < 0.01
    assert torch.equal(p * 255, torch.round(p * 255))                      # stays on the 8-bit grid
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
    bpd = ood.codec_bits_per_dim(torch.cat([constant, ramp, noise]), 8, "png")
    assert bpd[0] < bpd[1] < bpd[2] and bpd[2] > 7.5
    # the count is the IDAT payload: the whole file minus signature and chunk framing (57 bytes)
    buffer = io.BytesIO()
    Image.fromarray(np.round(noise[0, 0].numpy() * 255).astype(np.uint8)).save(
        buffer, format="PNG", optimize=True, compress_level=9)
    assert bpd[2] == 8 * (len(buffer.getvalue()) - 57) / 256
    # lossless, with the layouts for C = 1, 3 and other C
    for c in (1, 2, 3):
        img = (torch.randint(0, 256, (c, 8, 8), generator=g)).to(torch.uint8).numpy()
        decoded = np.asarray(Image.open(io.BytesIO(_encode(ood._to_pil(img)))))
        expected = img[0] if c == 1 else img.transpose(1, 2, 0) if c == 3 else img.reshape(-1, 8)
        assert np.array_equal(decoded, expected)
    assert "PNG" in ood.codec_description("png") and "compress_level=9" in ood.codec_description("png")


def _encode(pil):
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return buffer.getvalue()


def test_codec_sees_the_models_bit_depth_and_webp_works():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (3, 3, 8, 8), generator=g).float() / 255
    five_bit = torch.floor(torch.round(images * 255) / 8) / 255      # the 5-bit integers as 8-bit samples
    assert np.array_equal(ood.codec_bits_per_dim(images, 5, "png"), ood.codec_bits_per_dim(five_bit, 8, "png"))
    webp = ood.codec_bits_per_dim(torch.cat([torch.full((1, 3, 8, 8), 0.2), images]), 8, "webp")
    assert webp[0] < webp[1] and "WebP lossless" in ood.codec_description("webp")
    with pytest.raises(GlowflowError):
        ood.codec_bits_per_dim(images, 8, "jpeg")
