"""The fast path (the default) computes the plain layer-by-layer mathematics: same bits/dim, latents,
log-dets, gradients, reconstructions and samples, for every architecture, and its eval-mode cache
never serves stale weights (optimizer steps, load_state_dict, in-place edits, dtype changes)."""

import io

import pytest
import torch

from glowflow import Glow, GlowflowError, bits_per_dim, dequantize
from glowflow.layers import ActNorm
from glowflow.runtime import autocast_context, eager
from tests.helpers import architecture_combinations, combo_id, labels_for, randomised_model

COMBOS = list(architecture_combinations())
SHAPE = (3, 16, 16)
TOL = 1e-5  # bits/dim, float32 (the fast path's contract)


def _model(combo, dtype=torch.float32, seed=0):
    # a gentle perturbation keeps bits/dim of order 10, where float32 resolves 1e-6
    return randomised_model(SHAPE, 3, combo, K=2, hidden=16, dtype=dtype, seed=seed, scale=0.03)


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
        fast, plain = _both(model, lambda: model.bits_per_dim(x, 8, y))
        assert _max_diff(fast, plain) < TOL
        if model.config.y_condition:  # the class mixture (no labels)
            fast, plain = _both(model, lambda: model.bits_per_dim(x))
            assert _max_diff(fast, plain) < TOL
        (z_fast, ld_fast), (z_plain, ld_plain) = _both(model, lambda: model.encode(x))
        assert _max_diff(z_fast, z_plain) < 1e-5 and _max_diff(ld_fast, ld_plain) < 1e-2  # nats per image
        assert all(z.is_contiguous() for z in z_fast)
        rec_fast, rec_plain = _both(model, lambda: model.decode(z_plain))
        assert _max_diff(rec_fast, rec_plain) < 1e-5 and _max_diff(rec_fast, x) < 1e-4

        def draw():
            torch.manual_seed(7)
            return model.sample(4, 0.7, y=None if y is None else y[:4])

        sample_fast, sample_plain = _both(model, draw)
        assert sample_fast.is_contiguous() and _max_diff(sample_fast, sample_plain) < 1e-5


@pytest.mark.parametrize(
    "combo", [COMBOS[1], COMBOS[15], COMBOS[-1]], ids=["lu-additive", "lu-affine-all", "reverse-affine-all"]
)
def test_training_gradients_match_in_float64(combo):
    model = _model(combo, dtype=torch.float64).train()
    x, y = _data(4, torch.float64), labels_for(model, 4)

    def grads():
        model.zero_grad()
        log_prob, logits = model(x, y)
        loss = bits_per_dim(log_prob, model.num_dims).mean() + (0 if logits is None else logits.square().mean())
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    (loss_fast, g_fast), (loss_plain, g_plain) = _both(model, grads)
    assert abs(loss_fast - loss_plain) < 1e-12
    for a, b in zip(g_fast, g_plain):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-11)


def _check_same(model, x, y=None):
    with torch.no_grad():
        fast, plain = _both(model, lambda: model.bits_per_dim(x, 8, y))
    assert _max_diff(fast, plain) < TOL
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
        loss = bits_per_dim(log_prob, model.num_dims).mean()
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
    assert _max_diff(_check_same(model, x), original) < 1e-6
    # dtype change: the cache is keyed on dtype and storage
    model.double()
    assert _max_diff(_check_same(model, x.double()), original.double()) < 1e-5


def test_fast_path_initialises_actnorm_like_the_plain_path():
    x = _data(16)

    def build():
        torch.manual_seed(3)
        return Glow(image_shape=SHAPE, hidden_channels=16, K=2, L=2, flow_permutation="shuffle")

    fast, plain = build(), build()
    plain.fast = False
    fast.initialize(x)
    plain.initialize(x)
    assert fast.is_initialized() and plain.is_initialized()
    for (name, a), b in zip(fast.state_dict().items(), plain.state_dict().values()):
        assert torch.allclose(a.double(), b.double(), atol=1e-5), name


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
    assert _max_diff(fast_cl, plain) < TOL and _max_diff(fast_nchw, plain) < TOL


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
    bits_per_dim(log_prob, model.num_dims).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.no_grad():
        reference = model.bits_per_dim(x)
        with autocast_context("cpu", "bf16"):
            low = model.bits_per_dim(x)
    assert low.dtype == torch.float32 and _max_diff(low, reference) < 5e-2
    with autocast_context("cpu", "none"):
        pass
    with pytest.raises(GlowflowError, match="amp"):
        autocast_context("cpu", "fp8")


def test_initialised_check_does_not_reread_the_buffer_until_it_changes(monkeypatch):
    model = _model(COMBOS[0])
    step = model.fused.levels[0][0]
    actnorm = step.step.actnorm
    assert step.is_initialized()
    reads = []
    monkeypatch.setattr(ActNorm, "__bool__", lambda self: reads.append(1) or True, raising=False)
    calls = []
    original = torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: calls.append(1) or original(t))
    assert step.is_initialized() and not calls  # remembered: no read of the buffer
    monkeypatch.undo()
    actnorm.initialized.fill_(0)  # a write bumps the version: re-read
    assert not step.is_initialized()
    actnorm.initialized.fill_(1)
    assert step.is_initialized()
