"""The fast path (the default) computes the plain layer-by-layer mathematics: same bits/dim, latents,
log-dets, gradients, reconstructions and samples, for every architecture, and its eval-mode cache
never serves stale weights (optimizer steps, load_state_dict, in-place edits, dtype changes)."""

import io
import math

import pytest
import torch

from glowflow import Glow, GlowConfig, GlowflowError, bits_per_dim, dequantize
from glowflow.runtime import autocast_context, eager, native_bf16
from tests.helpers import architecture_combinations, combo_id, labels_for, randomised_model

COMBOS = list(architecture_combinations())
SHAPE = (3, 16, 16)
K, L = 2, 3
# Tolerances, float32. The fast path folds layers together and runs other kernels than the plain one,
# so the two round differently, and by how much depends on the CPU's kernels (SIMD width, oneDNN,
# MKL, threads): a fixed 1e-5 is not a promise any machine keeps. Each of the two results is within
# about eps * size * depth of the exact value, with eps = 2**-23 (float32), size the magnitude of
# the numbers it is computed from, and depth the roundings in sequence: K * L flow steps, then
# log2(D) levels of pairwise sums over the D dimensions. The tolerance on their difference is
# 4 * eps * size * DEPTH: 2 for a difference of two such results, 2 for the two roundings of each
# step (its coupling network's output and the affine map). Measured under every kernel choice
# PyTorch offers (ATen default/AVX2/AVX512, oneDNN capped at SSE4.1/AVX2, MKL capped at SSE4.2, one
# or two threads): at least 12x under these; a real fast-path bug (a dropped log-det term, a
# mis-folded ActNorm) is off by orders of magnitude more.
EPS32 = 2.0**-23
DEPTH = K * L + math.ceil(math.log2(math.prod(SHAPE)))


def _tol(size):
    """Tolerance on the difference of two float32 results computed from numbers of ``size``."""
    return 4 * EPS32 * DEPTH * float(size)


def _bpd_tol(model, x, bpd):
    """bits/dim = -(logdet + prior log-density) / (D ln 2) + const: its size is that of its two
    terms (hundreds of nats each) in bits/dim, not of the result."""
    with torch.no_grad():
        _, logdet = model.encode(x)
    return _tol(bpd.abs().max() + logdet.abs().max() / (model.num_dims * math.log(2)))


def _model(combo, dtype=torch.float32, seed=0):
    # a gentle perturbation keeps bits/dim of order 10, where float32 resolves 1e-6
    return randomised_model(SHAPE, L, combo, K=K, hidden=16, dtype=dtype, seed=seed, scale=0.03)


def _data(n, dtype=torch.float32, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.floor(torch.rand((n, *SHAPE), generator=generator, dtype=dtype) * 256) / 256 - 0.5
    return dequantize(x, 8, generator)


def _both(model, fn):
    """fn() on the fast path, then on the plain one."""
    assert model.fast
    fast = fn()
    with eager(model):
        plain = fn()
    assert model.fast
    return fast, plain


def _max_diff(a, b):
    if isinstance(a, (list, tuple)):
        return max(_max_diff(u, v) for u, v in zip(a, b))
    return (a - b).abs().max().item()


@pytest.mark.parametrize("combo", COMBOS, ids=[combo_id(c) for c in COMBOS])
def test_fast_equals_eager(combo):
    model = _model(combo)
    x = _data(6)
    y = labels_for(model, 6)
    with torch.inference_mode():
        fast, plain = _both(model, lambda: model.bits_per_dim(x, y))
        assert _max_diff(fast, plain) < _bpd_tol(model, x, plain)
        if model.config.y_condition:  # the class mixture (no labels)
            fast, plain = _both(model, lambda: model.bits_per_dim(x))
            assert _max_diff(fast, plain) < _bpd_tol(model, x, plain)
        (z_fast, ld_fast), (z_plain, ld_plain) = _both(model, lambda: model.encode(x))
        z_size = max(z.abs().max() for z in z_plain)  # the activations' size: the latents'
        assert _max_diff(z_fast, z_plain) < _tol(z_size)
        assert _max_diff(ld_fast, ld_plain) < _tol(ld_plain.abs().max())  # nats per image
        assert all(z.is_contiguous() for z in z_fast)
        rec_fast, rec_plain = _both(model, lambda: model.decode(z_plain))
        # decoding goes back through the activations of the latents' size; the round trip to x
        # adds the encoding's rounding (twice the tolerance)
        assert _max_diff(rec_fast, rec_plain) < _tol(z_size) and _max_diff(rec_fast, x) < 2 * _tol(z_size)

        def draw():
            torch.manual_seed(7)
            return model.sample(4, 0.7, y=None if y is None else y[:4])

        sample_fast, sample_plain = _both(model, draw)  # latents at temperature 0.7: smaller than z_size
        assert sample_fast.is_contiguous() and _max_diff(sample_fast, sample_plain) < _tol(z_size)


@pytest.mark.parametrize(
    "combo", [COMBOS[1], COMBOS[15], COMBOS[-1]], ids=["lu-additive", "lu-affine-all", "reverse-affine-all"]
)
def test_training_gradients_match_in_float64(combo):
    model = _model(combo, dtype=torch.float64).train()
    x, y = _data(4, torch.float64), labels_for(model, 4)

    def grads():
        model.zero_grad()
        log_prob, logits = model(x, y)
        bpd = bits_per_dim(log_prob, model.num_dims, model.config.n_bits)
        loss = bpd.mean() + (0 if logits is None else logits.square().mean())
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    (loss_fast, g_fast), (loss_plain, g_plain) = _both(model, grads)
    assert abs(loss_fast - loss_plain) < 1e-12
    for a, b in zip(g_fast, g_plain):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-11)


def _check_same(model, x, y=None):
    with torch.no_grad():
        fast, plain = _both(model, lambda: model.bits_per_dim(x, y))
    assert _max_diff(fast, plain) < _bpd_tol(model, x, plain)
    return fast


@pytest.mark.parametrize("fused", [False, True], ids=["adamax", "adam-fused"])
def test_cache_follows_optimizer_steps(fused):
    combo = COMBOS[0]  # invconv, additive
    model = _model(combo).eval()
    x = _data(8)
    before = _check_same(model, x)
    _check_same(model, x)  # served from the cache
    assert len(model.fused.cache) > 0
    if fused:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    else:
        optimizer = torch.optim.Adamax(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(2):
        log_prob, _ = model(x)
        loss = bits_per_dim(log_prob, model.num_dims, model.config.n_bits).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    after = _check_same(model, x)
    assert _max_diff(before, after) > 1e-3  # the weights did move, and the fast path saw it


def test_cache_follows_inplace_edits_and_load_state_dict():
    model = _model(COMBOS[9]).eval()  # invconv LU, affine
    x = _data(8)
    original = _check_same(model, x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)  # in place, still in eval mode, no forward pass in between
    moved = _check_same(model, x)
    assert _max_diff(original, moved) > 1e-4
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    model.load_state_dict(torch.load(buffer, weights_only=True))
    reloaded = _check_same(model, x)
    assert _max_diff(reloaded, original) < _bpd_tol(model, x, original)  # the same weights again (not 1.01x)
    # dtype change: the cache is keyed on dtype and storage; float64 is within float32's rounding
    tolerance = _bpd_tol(model, x, original)
    model.double()
    assert _max_diff(_check_same(model, x.double()), original.double()) < tolerance


def test_fast_path_initialises_actnorm_like_the_plain_path():
    x = _data(16)

    def build():
        torch.manual_seed(3)
        return Glow(GlowConfig(image_shape=SHAPE, hidden_channels=16, K=2, L=2, flow_permutation="shuffle"))

    fast, plain = build(), build()
    plain.fast = False
    fast.initialize(x)
    plain.initialize(x)
    assert fast.is_initialized() and plain.is_initialized()
    # ActNorm's log-scale is log(1 / std of its input): its error is the relative error of that std,
    # eps * depth (here L = 2) whatever its value; its bias is minus a mean of activations of order one
    tolerance = 4 * EPS32 * (K * 2 + math.ceil(math.log2(math.prod(SHAPE))))
    for (name, a), b in zip(fast.state_dict().items(), plain.state_dict().values()):
        assert torch.allclose(a.double(), b.double(), rtol=tolerance, atol=tolerance), name


def test_decode_leaves_the_callers_latents_alone_and_channels_last_off_agrees():
    model = _model(COMBOS[12])  # invconv, affine, learn_top
    x = _data(4)
    with torch.no_grad():
        latents, _ = model.encode(x)
        copies = [z.clone() for z in latents]
        model.decode(latents)
        assert all(torch.equal(a, b) for a, b in zip(latents, copies))
        fast_cl = model.bits_per_dim(x)
        model.channels_last = False
        fast_nchw, plain = _both(model, lambda: model.bits_per_dim(x))
    tolerance = _bpd_tol(model, x, plain)
    assert _max_diff(fast_cl, plain) < tolerance and _max_diff(fast_nchw, plain) < tolerance


def test_bf16_autocast_keeps_log_densities_in_float32():
    model = _model(COMBOS[15]).train()  # invconv LU, affine, learned and class-conditional top prior
    x = _data(8)
    with autocast_context("cpu", "bf16"):
        log_prob, _ = model(x)
        weight, bias, pixel_logdet, _ = model.fused.levels[0][0].params()
        top_mean, top_log_std = model.top_prior(2, labels_for(model, 2))
    assert log_prob.dtype == torch.float32 and top_mean.dtype == top_log_std.dtype == torch.float32
    # the 1x1 convolution's folded weight and bias stay float32 (a bf16 W would no longer have
    # the log-determinant the density uses)
    assert weight.dtype == bias.dtype == pixel_logdet.dtype == torch.float32
    bits_per_dim(log_prob, model.num_dims, model.config.n_bits).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.no_grad():
        reference = model.bits_per_dim(x)
        with autocast_context("cpu", "bf16"):
            low = model.bits_per_dim(x)
    assert low.dtype == torch.float32 and _max_diff(low, reference) < 5e-2
    with autocast_context("cpu", "none"):
        pass
    # "auto": bf16 exactly where the CPU computes it natively, else float32
    with torch.no_grad(), autocast_context("cpu", "auto"):
        auto = model.bits_per_dim(x)
    assert torch.equal(auto, low) if native_bf16("cpu") else torch.equal(auto, reference)
    with pytest.raises(GlowflowError, match="amp"):
        autocast_context("cpu", "fp8")


def test_initialised_check_does_not_reread_the_buffer_until_it_changes(monkeypatch):
    model = _model(COMBOS[0])
    step = model.fused.levels[0][0]
    actnorm = step.step.actnorm
    assert step.is_initialized()
    reads = []  # every tensor whose value is read (bool(tensor): what would synchronise a GPU)
    original = torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: reads.append(t) or original(t))
    assert step.is_initialized() and not reads  # remembered: no read of the buffer
    actnorm.initialized.fill_(0)  # a write bumps the version: re-read
    assert not step.is_initialized()
    assert reads and reads[0] is actnorm.initialized  # the changed buffer was read, not remembered
    reads.clear()
    actnorm.initialized.fill_(1)
    assert step.is_initialized()
    buffers = [a.initialized for a in (actnorm, step.step.coupling.net[0].actnorm, step.step.coupling.net[2].actnorm)]
    assert len(reads) == 3 and all(r is b for r, b in zip(reads, buffers))  # each of the step's ActNorms, once
    reads.clear()
    assert step.is_initialized() and step.is_initialized() and not reads  # remembered again
    monkeypatch.undo()
