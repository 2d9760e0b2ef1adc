"""The priors' fitted Gaussians (glowflow/latent_fit.py, ``prior_fit``): the fit is the
maximum-likelihood Gaussian, the model's log-density with it is the brute-force one (and still
integrates to one), the fast path agrees, draws follow it, stored fits are checked on reading, and
models without the field are the paper's."""

import math

import pytest
import torch

from glowflow import Glow, GlowConfig
from glowflow.checkpoint import load_checkpoint, save_checkpoint
from glowflow.errors import GlowflowError
from glowflow.latent_fit import FIT_RIDGE, LatentGaussian, LatentMoments
from tests.helpers import importance_sampling_integral, randomised_model


def _fitted(shape, full, e):
    gaussian = LatentGaussian(shape, full=full).double()
    moments = LatentMoments(math.prod(shape), gaussian.full)
    for part in e.split(37):  # sums over batches equal one pass
        moments.add(part)
    gaussian.fit(moments)
    return gaussian


@pytest.mark.parametrize("full", [True, False])
def test_fit_is_the_maximum_likelihood_gaussian_and_its_density_is_exact(full):
    torch.manual_seed(0)
    shape = (2, 2, 3)
    d = math.prod(shape)
    mixing = torch.randn(d, d, dtype=torch.float64) * 0.4 + torch.eye(d, dtype=torch.float64)
    e = (torch.randn(500, d, dtype=torch.float64) @ mixing.T + 0.3).view(500, *shape)
    gaussian = _fitted(shape, full, e)
    flat = e.flatten(1)
    mean = flat.mean(0)
    covariance = (flat - mean).T @ (flat - mean) / len(flat)
    if not full:
        covariance = torch.diag(torch.diagonal(covariance))
    covariance += FIT_RIDGE * torch.eye(d, dtype=torch.float64)
    fitted = torch.distributions.MultivariateNormal(mean, covariance)
    standard = torch.distributions.MultivariateNormal(torch.zeros(d, dtype=torch.float64), torch.eye(d).double())
    test = torch.randn(20, *shape, dtype=torch.float64)
    expected = fitted.log_prob(test.flatten(1)) - standard.log_prob(test.flatten(1))
    assert torch.allclose(gaussian.log_density_change(test), expected, rtol=0, atol=1e-9)
    # maximum likelihood: moving the fit's mean or scale lowers the fitting data's likelihood
    base = gaussian.log_density_change(e).mean()
    for moved in (lambda g: g.shift.add_(0.05), lambda g: g.scale.mul_(1.05), lambda g: g.scale.mul_(0.95)):
        other = _fitted(shape, full, e)
        moved(other)
        assert other.log_density_change(e).mean() < base


def test_unfitted_gaussian_is_the_identity_and_a_reset_returns_to_it():
    gaussian = LatentGaussian((1, 2, 2), full=True)
    e = torch.randn(5, 1, 2, 2)
    assert torch.equal(gaussian.log_density_change(e), torch.zeros(5))
    assert torch.equal(gaussian.draw(e, 0.7), 0.7 * e)
    gaussian.fit(_moments(torch.randn(50, 4) * 2))
    assert gaussian.is_fitted and not torch.equal(gaussian.log_density_change(e), torch.zeros(5))
    gaussian.reset()
    assert not gaussian.is_fitted and torch.equal(gaussian.scale, torch.eye(4))


def _moments(e):
    moments = LatentMoments(e.shape[1], True)
    moments.add(e)
    return moments


def _fitted_model(combo=None, shape=(2, 8, 8), L=2, prior_fit="full", n=64):
    combo = {"flow_permutation": "invconv", "flow_coupling": "affine", "learn_top": True, **(combo or {})}
    combo["prior_fit"] = prior_fit
    model = randomised_model(shape, L, combo)
    torch.manual_seed(1)
    x = torch.rand(n, *shape, dtype=torch.float64) - 0.5
    y = torch.arange(n) % 3 if model.config.y_condition else None
    return model, x, y


@pytest.mark.parametrize("prior_fit", ["full", "diag"])
@pytest.mark.parametrize("y_condition", [False, True])
def test_fitted_model_log_prob_adds_each_latents_brute_force_gaussian(prior_fit, y_condition):
    model, x, y = _fitted_model({"y_condition": y_condition}, prior_fit=prior_fit)
    before = model.log_prob(x, y)
    assert model.fit_priors([(x[:32], None if y is None else y[:32]), (x[32:], None if y is None else y[32:])]) == 64
    after = model.log_prob(x, y)
    gain = torch.zeros(len(x), dtype=torch.float64)
    for e, gaussian in zip(model.standardised_latents(x, y), model.fitted_gaussians()):
        flat = e.flatten(1)
        cov = gaussian.scale @ gaussian.scale.T if gaussian.full else torch.diag(gaussian.scale**2)
        fitted = torch.distributions.MultivariateNormal(gaussian.shift, cov)
        standard = torch.distributions.MultivariateNormal(
            torch.zeros_like(gaussian.shift), torch.eye(len(cov)).double()
        )
        gain += fitted.log_prob(flat) - standard.log_prob(flat)
    assert torch.allclose(after - before, gain, rtol=0, atol=1e-8)
    assert after.mean() > before.mean()  # maximum likelihood on these very images
    model.fast = False
    assert torch.allclose(model.log_prob(x, y), after, rtol=0, atol=1e-9)  # the plain layers agree


def test_fitted_model_density_integrates_to_one():
    """Importance sampling as tests/test_model.py does, on a model whose top prior is fitted to
    a skewed sample (its standardised latents far from N(0, I))."""
    model = randomised_model((1, 2, 2), 1, {"learn_top": True, "prior_fit": "full"}, K=3, hidden=4, scale=0.15)
    torch.manual_seed(7)
    model.fit_priors([(0.3 * torch.rand(200, 1, 2, 2, dtype=torch.float64) - 0.1, None)])
    gaussian = model.fitted_gaussians()[0]
    assert gaussian.is_fitted and (torch.diagonal(gaussian.scale) < 0.9).any()
    estimate, standard_error = importance_sampling_integral(model, (1, 2, 2))
    assert standard_error < 0.01, standard_error
    assert abs(estimate - 1.0) < 0.03, estimate


def test_draws_follow_the_fitted_gaussian_and_temperature_zero_is_its_mean():
    model, x, _ = _fitted_model(shape=(1, 4, 4), L=1)
    model.fit_priors([(x, None)])
    gaussian = model.fitted_gaussians()[0]
    torch.manual_seed(3)
    samples = model.sample(4000, 1.0, redraw=False)
    e = model.standardised_latents(samples)[0].flatten(1)
    cov = gaussian.scale @ gaussian.scale.T
    # the sample mean is off by its standard error sqrt(var / n): allow 5 of them per value
    assert ((e.mean(0) - gaussian.shift).abs() < 5 * torch.sqrt(torch.diagonal(cov) / 4000)).all()
    assert torch.allclose(torch.cov(e.T), cov, rtol=0, atol=0.15 * cov.abs().max().item())
    zero = model.standardised_latents(model.sample(3, 0.0, redraw=False))[0].flatten(1)
    assert torch.allclose(zero, gaussian.shift.expand(3, -1), atol=1e-8)


def test_unfitted_priors_compute_exactly_the_papers_model():
    for combo in ({}, {"y_condition": True}):
        paper, x, y = _fitted_model(combo, prior_fit="none")
        unfitted, _, _ = _fitted_model(combo, prior_fit="full")
        assert torch.equal(paper.log_prob(x, y), unfitted.log_prob(x, y))
        torch.manual_seed(5)
        a = paper.sample(4, 0.8, y=y[:4] if y is not None else None, redraw=False)
        torch.manual_seed(5)
        b = unfitted.sample(4, 0.8, y=y[:4] if y is not None else None, redraw=False)
        assert torch.equal(a, b)


def test_fitted_checkpoint_round_trips_and_a_damaged_fit_is_refused(tmp_path):
    model, x, _ = _fitted_model()
    model.fit_priors([(x, None)])
    path = str(tmp_path / "fitted.pt")
    save_checkpoint(path, model)
    loaded = load_checkpoint(path)  # checkpoints hold float32 weights
    assert loaded.config.prior_fit == "full"
    stored = model.float().state_dict()
    assert all(torch.equal(value, stored[name]) for name, value in loaded.state_dict().items())
    assert torch.equal(loaded.log_prob(x.float()), model.log_prob(x.float()))
    model.double()
    for damage, words in (
        (lambda s: s["splits.0.gaussian.scale"].diagonal().__setitem__(0, 0.0), "not positive"),
        (lambda s: s["top_gaussian.scale"].__setitem__((0, 1), 0.5), "not a lower triangular"),
    ):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        damage(state)
        bad = Glow(model.config).double()
        bad.load_state_dict(state)
        save_checkpoint(str(tmp_path / "bad.pt"), bad)
        with pytest.raises(GlowflowError, match=words):
            load_checkpoint(str(tmp_path / "bad.pt"))


def test_a_configuration_written_before_the_field_reads_as_the_papers_priors(tmp_path):
    model = Glow(GlowConfig(image_shape=(1, 8, 8), K=1, L=2, hidden_channels=4, prior_fit="none"))
    path = str(tmp_path / "old.pt")
    save_checkpoint(path, model)
    payload = torch.load(path, weights_only=True)
    del payload["model_config"]["prior_fit"]
    torch.save(payload, path)
    assert load_checkpoint(path).config.prior_fit == "none"
    assert GlowConfig().prior_fit == "full"  # new models fit their priors
    with pytest.raises(GlowflowError, match="prior_fit must be one of"):
        GlowConfig(prior_fit="dense")
