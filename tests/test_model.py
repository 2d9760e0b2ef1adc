"""Exactness of the flow: invertibility, log-determinants, normalisation, state, sampling, bits/dim."""

import io
import math

import pytest
import torch
from torch.autograd.functional import jacobian

from glowflow import Glow, GlowConfig, bits_per_dim, dequantize, preprocess
from glowflow.layers import squeeze2x
from glowflow.model import classification_loss
from glowflow.pixels import dequantization_noise, discretisation_nats, postprocess, quantize
from tests.helpers import (
    architecture_combinations,
    combo_id,
    importance_sampling_integral,
    labels_for,
    randomised_model,
)

COMBOS = list(architecture_combinations())
IDS = [combo_id(c) for c in COMBOS]


def test_every_combination_is_listed():
    # 3 permutations x 2 couplings x 2 learn_top x 2 y_condition, plus LU for invconv
    assert len(COMBOS) == 32


@pytest.mark.parametrize("combo", COMBOS, ids=IDS)
@pytest.mark.parametrize("L", [1, 2, 3])
def test_decode_inverts_encode(combo, L):
    shape = (3, 8, 8)
    model = randomised_model(shape, L, combo)
    x = torch.rand(4, *shape, dtype=torch.float64) - 0.5
    with torch.no_grad():
        latents, _ = model.encode(x)
        assert sum(z[0].numel() for z in latents) == x[0].numel()
        assert [tuple(z.shape[1:]) for z in latents] == model.latent_shapes
        assert (model.decode(latents) - x).abs().max().item() < 1e-10
        # float32: how far rounding takes the round trip depends on the CPU's kernels and on how much
        # this flow amplifies a rounding, so the tolerance is measured in float64, not fixed: x moves
        # by ``amplified`` when every latent is moved by one float32 rounding (relative 2**-23, random
        # signs). The float32 round trip rounds at each of its 2 K L steps (encoding and decoding);
        # 16 covers a random draw's underestimate of the worst direction and the several roundings
        # within a step. Measured under every kernel choice PyTorch offers: at most 1/11 of this
        # (which is 3e-6 to 6e-3 depending on the flow's conditioning); a wrong inverse (a layer
        # left out, a sign) is off by order 0.1, and the float64 check above is the exact one.
        g = torch.Generator().manual_seed(0)
        moved = [z * (1 + 2.0**-23 * (2 * torch.rand(z.shape, generator=g, dtype=z.dtype) - 1)) for z in latents]
        amplified = (model.decode(moved) - x).abs().max().item()
        tolerance = 16 * (2 * model.config.K * L) * amplified
        model32 = model.float()
        x32 = x.float()
        error = (model32.decode(model32.encode(x32)[0]) - x32).abs().max().item()
        assert error < tolerance, (error, tolerance)


def _flat_latents(model):
    def f(x_flat, shape):
        latents, _ = model.encode(x_flat.view(1, *shape))
        return torch.cat([z.reshape(-1) for z in latents])

    return f


# (image shape, L): 1x4x4, 2x4x4, 3x4x4 at L = 1, 2, and 8x8 images for L = 3.
JACOBIAN_CASES = [((c, 4, 4), L) for c in (1, 2, 3) for L in (1, 2)] + [((1, 8, 8), 3), ((3, 8, 8), 3)]


@pytest.mark.parametrize("combo", COMBOS, ids=IDS)
def test_logdet_matches_brute_force_jacobian(combo):
    for shape, L in JACOBIAN_CASES:
        model = randomised_model(shape, L, combo, K=2, hidden=4)
        x = torch.rand(1, *shape, dtype=torch.float64) - 0.5
        f = _flat_latents(model)
        jac = jacobian(lambda v, f=f, shape=shape: f(v, shape), x.reshape(-1), vectorize=True)
        expected = torch.linalg.slogdet(jac)[1]
        _, logdet = model.encode(x)
        assert abs(logdet.item() - expected.item()) < 1e-8, (shape, L, logdet.item(), expected.item())
        # log_prob's log-det part is the same number
        assert torch.allclose(model.forward_terms(x, labels_for(model, 1)).logdet, logdet, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "combo",
    [
        dict(
            flow_permutation="invconv", flow_coupling="affine", LU_decomposed=False, learn_top=False, y_condition=False
        ),
        dict(
            flow_permutation="shuffle", flow_coupling="additive", LU_decomposed=False, learn_top=True, y_condition=True
        ),
    ],
    ids=["affine-invconv", "additive-shuffle-learntop-ycond-marginal"],
)
def test_log_prob_integrates_to_one(combo):
    """Importance sampling: E_q[p(x) / q(x)] = integral of p = 1, q a wide Gaussian."""
    shape = (1, 2, 2)
    model = randomised_model(shape, 1, combo, K=3, hidden=4, scale=0.15)
    torch.manual_seed(123)
    estimate, standard_error = importance_sampling_integral(model, shape)
    assert standard_error < 0.01, standard_error
    assert abs(estimate - 1.0) < 0.03, estimate


@pytest.mark.parametrize(
    "combo",
    [c for c in COMBOS if c["flow_permutation"] != "reverse"][:8] + [COMBOS[-1]],
    ids=[combo_id(c) for c in ([c for c in COMBOS if c["flow_permutation"] != "reverse"][:8] + [COMBOS[-1]])],
)
def test_state_dict_round_trip_is_bit_exact(combo):
    shape = (2, 8, 8)
    model = randomised_model(shape, 2, combo, dtype=torch.float32, seed=1)
    x = torch.rand(5, *shape) - 0.5
    y = labels_for(model, 5)
    with torch.no_grad():
        expected = model.log_prob(x, y)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(999)  # another shuffle order and another random init
    fresh = Glow(GlowConfig(image_shape=shape, hidden_channels=8, K=2, L=2, num_classes=3, **combo))
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.is_initialized()
    fresh.train()  # training mode must not re-initialise ActNorm after a load
    with torch.no_grad():
        got = fresh.log_prob(x, y)
    assert torch.equal(got, expected)
    if combo["flow_permutation"] == "shuffle":
        assert torch.equal(fresh.levels[0][0].permute.indices, model.levels[0][0].permute.indices)


def test_actnorm_initialises_once_from_data():
    torch.manual_seed(0)
    model = Glow(GlowConfig(image_shape=(1, 8, 8), hidden_channels=8, K=1, L=1))
    assert not model.is_initialized()
    x = torch.rand(64, 1, 8, 8) * 0.3 + 0.1
    model.initialize(x)
    assert model.is_initialized()
    first = model.levels[0][0].actnorm
    out, _ = first(squeeze2x(x))
    assert out.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    assert (out.std(dim=(0, 2, 3), unbiased=False) - 1.0).abs().max() < 1e-3
    bias = first.bias.clone()
    model.train()
    model.log_prob(torch.rand(8, 1, 8, 8))  # another batch: no re-initialisation
    assert torch.equal(first.bias, bias)


@pytest.mark.parametrize("y_condition,multilabel", [(False, False), (True, False), (True, True)])
def test_sample_shapes_and_temperature_zero_is_prior_mean(y_condition, multilabel):
    combo = dict(
        flow_permutation="invconv", flow_coupling="affine", LU_decomposed=True, learn_top=True, y_condition=y_condition
    )
    shape = (3, 8, 8)
    # a gentle perturbation: the inverse of a random, untrained flow can overflow far from its data
    model = randomised_model(shape, 3, combo, scale=0.03)
    model.config.y_multilabel = multilabel
    for temperature in (0.0, 0.5, 0.7, 1.0):
        assert model.sample(6, temperature).shape == (6, *shape)
    if y_condition:
        y = (
            torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
            if multilabel
            else torch.tensor([0, 2])
        )
        x0 = model.sample(2, 0.0, y=y)
        assert x0.shape == (2, *shape)
        assert torch.equal(x0, model.sample(2, 0.0, y=y))  # deterministic at temperature 0
    else:
        y = None
        x0 = model.sample(2, 0.0)
    assert torch.isfinite(x0).all()
    with torch.no_grad():
        terms_latents, _ = model.encode(x0)
        # every split latent is its prior mean given the kept half, the top latent is the top prior's mean
        h = x0
        for index, steps in enumerate(model.levels):
            h = squeeze2x(h)
            for step in steps:
                h, _ = step(h)
            if index < len(model.splits):
                kept = h[:, : model.splits[index].keep]
                mean, _ = model.splits[index].mean_log_std(kept)
                assert (terms_latents[index] - mean).abs().max() < 1e-9
                h = kept
        top_mean, _ = model.top_prior(2, y)
        assert (terms_latents[-1] - top_mean).abs().max() < 1e-9


def test_sample_rejects_mismatched_labels():
    model = Glow(GlowConfig(image_shape=(1, 8, 8), hidden_channels=4, K=1, L=1, y_condition=True))
    with pytest.raises(ValueError):
        model.sample(3, y=torch.tensor([0, 1]))


def test_conditional_log_prob_without_labels_is_the_class_mixture():
    combo = dict(
        flow_permutation="invconv", flow_coupling="affine", LU_decomposed=False, learn_top=False, y_condition=True
    )
    model = randomised_model((1, 4, 4), 2, combo, scale=0.5)
    x = torch.rand(4, 1, 4, 4, dtype=torch.float64) - 0.5
    with torch.no_grad():
        per_class = torch.stack([model.log_prob(x, torch.full((4,), k)) for k in range(3)])
        marginal = model.log_prob(x)
        one_hot = model.log_prob(x, torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0]), 3).double())
    assert torch.allclose(marginal, torch.logsumexp(per_class, 0) - math.log(3), atol=1e-12)
    assert torch.allclose(one_hot, per_class[[0, 1, 2, 0], torch.arange(4)], atol=1e-12)


def test_bits_per_dim_equals_hand_formula():
    torch.manual_seed(0)
    n_bits = 5
    model = Glow(GlowConfig(image_shape=(1, 8, 8), hidden_channels=8, K=2, L=2, n_bits=n_bits)).double()
    images = torch.randint(0, 256, (6, 1, 8, 8)).double() / 255
    x = preprocess(images, n_bits)
    # pixel p -> floor(p / 2**(8 - n_bits)) / n_bins - 0.5
    pixels = torch.round(images * 255)
    assert torch.equal(x, torch.floor(pixels / 8) / 32 - 0.5)
    assert x.min() >= -0.5 and x.max() < 0.5
    x = dequantize(x, n_bits, torch.Generator().manual_seed(0))
    assert ((x - preprocess(images, n_bits)) >= 0).all() and ((x - preprocess(images, n_bits)) < 1 / 32).all()
    model.initialize(x)
    with torch.no_grad():
        latents, logdet = model.encode(x)
        # freshly built: split and top priors are standard normal (zero-initialised)
        log_prior = sum((-0.5 * (z**2 + math.log(2 * math.pi))).sum(dim=(1, 2, 3)) for z in latents)
        D = 64
        hand = -(log_prior + logdet - D * math.log(2**n_bits)) / (D * math.log(2))
        assert torch.allclose(model.bits_per_dim(x), hand, atol=1e-12)  # the model's own n_bits
        with pytest.warns(DeprecationWarning, match="n_bits"):  # check-only, deprecated for one release
            assert torch.allclose(model.bits_per_dim(x, n_bits=n_bits), hand, atol=1e-12)
        assert torch.allclose(bits_per_dim(model.log_prob(x), D, n_bits), hand, atol=1e-12)
        with pytest.raises(ValueError, match="5-bit"), pytest.warns(DeprecationWarning):
            model.bits_per_dim(x, n_bits=8)
        with pytest.raises(TypeError, match="n_bits is its own"):  # the old positional bits_per_dim(x, n_bits)
            model.bits_per_dim(x, 8)


def test_pixel_maps_need_n_bits():
    images = torch.rand(2, 1, 8, 8)
    for call in (
        lambda: quantize(images),
        lambda: preprocess(images),
        lambda: dequantization_noise(images.shape),
        lambda: dequantize(images),
        lambda: postprocess(images),
        lambda: discretisation_nats(64),
        lambda: bits_per_dim(torch.zeros(2), 64),
    ):
        with pytest.raises(TypeError, match="n_bits"):
            call()


def test_glow_takes_only_a_config():
    config = GlowConfig(image_shape=(1, 8, 8), hidden_channels=4, K=1, L=1)
    assert Glow(config).config is config
    for old in (
        lambda: Glow(image_shape=(1, 8, 8), hidden_channels=4, K=1, L=1),
        lambda: Glow((1, 8, 8), hidden_channels=4, K=1, L=1),
        lambda: Glow(config, K=2),
        lambda: Glow(),
    ):
        with pytest.raises(TypeError, match=r"Glow\(GlowConfig\("):
            old()


def test_classification_loss_single_and_multi_label():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, -3.0]])
    labels = torch.tensor([0, 2])
    expected = -(torch.log_softmax(logits, 1)[torch.arange(2), labels]).mean()
    assert torch.allclose(classification_loss(logits, labels, multilabel=False), expected)
    one_hot = torch.nn.functional.one_hot(labels, 3).float()
    assert torch.allclose(classification_loss(logits, one_hot, multilabel=False), expected)
    multi_hot = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    p = torch.sigmoid(logits)  # one sigmoid, on the logits (GenerativeZoo's script applied two)
    bce = -(multi_hot * torch.log(p) + (1 - multi_hot) * torch.log(1 - p)).mean()
    assert torch.allclose(classification_loss(logits, multi_hot, multilabel=True), bce, atol=1e-6)


def test_conditional_model_trains_with_integer_labels():
    model = Glow(GlowConfig(image_shape=(1, 8, 8), hidden_channels=8, K=1, L=2, y_condition=True, num_classes=4))
    x = torch.rand(8, 1, 8, 8) - 0.5
    y = torch.randint(0, 4, (8,))
    model.initialize(x)
    terms = model.forward_terms(x, y)
    loss = bits_per_dim(terms.log_prob, 64, 8).mean() + 0.01 * classification_loss(terms.y_logits, y, False)
    loss.backward()
    assert model.y_prior.linear.weight.grad is not None and model.classifier.linear.weight.grad is not None


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
@pytest.mark.parametrize("coupling", ["additive", "affine"])
def test_gradient_checkpointing_gives_the_same_gradients(fast, coupling):
    combo = dict(
        flow_permutation="invconv", flow_coupling=coupling, LU_decomposed=False, learn_top=True, y_condition=True
    )
    model = randomised_model((2, 8, 8), 2, combo).train()
    model.fast = fast
    x = torch.rand(6, 2, 8, 8, dtype=torch.float64) - 0.5
    y = labels_for(model, 6)

    def gradients(checkpointed):
        model.grad_checkpoint = checkpointed
        model.zero_grad()
        log_prob, logits = model(x, y)
        (-log_prob.mean() + classification_loss(logits, y, False)).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], rtol=1e-10, atol=1e-12), name


def test_gradient_checkpointing_leaves_actnorm_initialisation_alone():
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)) - 0.5
    torch.manual_seed(0)
    reference = Glow(GlowConfig(image_shape=(1, 8, 8), hidden_channels=8, K=2, L=2))
    torch.manual_seed(0)
    checkpointed = Glow(GlowConfig(image_shape=(1, 8, 8), hidden_channels=8, K=2, L=2))
    checkpointed.grad_checkpoint = True
    for model in (reference, checkpointed):
        model.train()
        model(x)[0].mean().backward()  # the first call initialises ActNorm from x
    for (name, a), b in zip(reference.state_dict().items(), checkpointed.state_dict().values()):
        assert torch.equal(a, b), name
