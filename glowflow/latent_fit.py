"""Closed-form Gaussians on the standardised latents: :class:`LatentGaussian`, the fitted part of a
prior, and :class:`LatentMoments`, the sums its maximum-likelihood fit is computed from.

Every prior of a Glow (a split prior N(mean(x_a), std(x_a)^2), or the top prior) standardises its
latent z (d values per image) to e = (z - mean) / std. The paper models e as N(0, I). With a fitted
:class:`LatentGaussian`, e is N(shift, S S^T) instead (S lower triangular with a positive diagonal,
or diagonal), so that

    log p(z | ...) = log N(e; shift, S S^T) - sum(log std)

still a normalised density of z (e is an invertible affine function of z given what the prior is
conditioned on). Fitted by maximum likelihood on training images, the Gaussian takes the
standardised latents' real means, spreads and correlations (at every position: the paper's priors
share one convolution across positions), which the learned priors reach only slowly; an unfitted
one (shift 0, S = I) is exactly the paper's prior. The mathematics is in docs/math.md.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from glowflow.config import FULL_COVARIANCE_MAX_DIMS

FIT_RIDGE = 1e-4
"""Added to the fitted covariance's diagonal (the standardised latents have variances near 1), so
that a latent value that is constant on the fitting images keeps a proper density."""


def fitted_gaussian(shape, prior_fit: str) -> Optional[LatentGaussian]:
    """The fitted Gaussian of a latent of ``shape`` (C, H, W) for ``prior_fit`` ('full': a full
    covariance up to FULL_COVARIANCE_MAX_DIMS values, else diagonal; 'diag'), or None ('none')."""
    if prior_fit == "none":
        return None
    return LatentGaussian(shape, full=None if prior_fit == "full" else False)


class LatentGaussian(nn.Module):
    """The Gaussian N(shift, S S^T) of a prior's standardised latent e, over its d = C*H*W values.

    Buffers: ``shift`` (d,); ``scale`` (d, d) lower triangular (``full``) or (d,) (diagonal);
    ``fitted`` (0 or 1; unfitted it is the identity and costs nothing).
    ``log_density_change(e)``: log N(e; shift, S S^T) - log N(e; 0, I), shape (N,), what the fit
    adds to the prior's log-density. ``draw(noise, temperature)``: shift + temperature * S noise,
    the standardised latent of a draw (noise standard normal, the latent's shape).
    """

    def __init__(self, shape, full: Optional[bool] = None):
        super().__init__()
        d = math.prod(shape)
        self.full = d <= FULL_COVARIANCE_MAX_DIMS if full is None else bool(full)
        self.register_buffer("shift", torch.zeros(d))
        self.register_buffer("scale", torch.eye(d) if self.full else torch.ones(d))
        self.register_buffer("fitted", torch.tensor(0, dtype=torch.uint8))

    @property
    def is_fitted(self) -> bool:
        return bool(self.fitted)

    def _whiten(self, e: torch.Tensor) -> torch.Tensor:
        """S^{-1} (e - shift), (N, d)."""
        centred = e - self.shift
        if self.full:
            return torch.linalg.solve_triangular(self.scale, centred.T, upper=False).T
        return centred / self.scale

    def _log_diag(self) -> torch.Tensor:
        return torch.log(torch.diagonal(self.scale) if self.full else self.scale).sum()

    def log_density_change(self, e: torch.Tensor) -> torch.Tensor:
        """(N,) log N(e; shift, S S^T) - log N(e; 0, I) for standardised latents ``e`` (N, ...),
        computed in the buffers' precision (at least float32); zeros when unfitted."""
        if not self.is_fitted:
            return e.new_zeros(e.shape[0])
        flat = e.reshape(e.shape[0], -1).to(self.shift.dtype)
        white = self._whiten(flat)
        change = 0.5 * (flat * flat).sum(1) - 0.5 * (white * white).sum(1) - self._log_diag()
        return change.to(e.dtype) if e.dtype in (torch.float32, torch.float64) else change

    def draw(self, noise: torch.Tensor, temperature: float) -> torch.Tensor:
        """Standardised latents shift + temperature * S noise, the shape of ``noise`` (N, ...)."""
        if not self.is_fitted:
            return temperature * noise
        flat = noise.reshape(noise.shape[0], -1).to(self.shift.dtype)
        spread = flat @ self.scale.T if self.full else flat * self.scale
        return (self.shift + temperature * spread).reshape(noise.shape).to(noise.dtype)

    @torch.no_grad()
    def fit(self, moments: LatentMoments) -> None:
        """Set shift and S to the maximum-likelihood Gaussian of the standardised latents summed
        in ``moments`` (computed in float64, plus :data:`FIT_RIDGE` on the variances)."""
        shift, scale = moments.gaussian()
        self.shift.copy_(shift)
        self.scale.copy_(scale)
        self.fitted.fill_(1)

    def reset(self) -> None:
        """Back to the identity (the paper's prior)."""
        self.shift.zero_()
        self.scale.copy_(torch.eye(self.shift.numel()) if self.full else torch.ones_like(self.shift))
        self.fitted.zero_()


def prior_log_density(
    log_p: torch.Tensor, gaussian: Optional[LatentGaussian], z: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor
) -> torch.Tensor:
    """A prior's log-density (N,) of ``z``: ``log_p``, the paper's Gaussian N(mean, std^2) summed,
    plus what a fitted ``gaussian`` changes (nothing when it is None or unfitted)."""
    if gaussian is None or not gaussian.is_fitted:
        return log_p
    return log_p + gaussian.log_density_change((z - mean) * torch.exp(-log_std))


def prior_draw(
    gaussian: Optional[LatentGaussian],
    mean: torch.Tensor,
    log_std: torch.Tensor,
    noise: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """A draw of a prior from standard normal ``noise`` (the latent's shape): the paper's
    mean + temperature std noise, or mean + std e with e the fitted ``gaussian``'s draw."""
    if gaussian is None or not gaussian.is_fitted:
        return mean + temperature * torch.exp(log_std) * noise
    return mean + torch.exp(log_std) * gaussian.draw(noise.contiguous(), temperature)


class LatentMoments:
    """Running float64 sums of standardised latents (d values each) for :meth:`LatentGaussian.fit`:
    the count, the sum and the sum of outer products (``full``) or of squares."""

    def __init__(self, d: int, full: bool, device=None):
        self.full = full
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.total = torch.zeros(d, dtype=torch.float64, device=device)
        self.squares = torch.zeros((d, d) if full else (d,), dtype=torch.float64, device=device)

    @property
    def finite(self) -> bool:
        """Whether every latent added was finite (and their squares too)."""
        return bool(torch.isfinite(self.total).all()) and bool(torch.isfinite(self.squares).all())

    @torch.no_grad()
    def add(self, e: torch.Tensor) -> None:
        """Add standardised latents ``e`` (N, ...) (N images)."""
        flat = e.reshape(e.shape[0], -1).double()
        self.count += flat.shape[0]
        self.total += flat.sum(0)
        self.squares += flat.T @ flat if self.full else (flat * flat).sum(0)

    def gaussian(self):
        """(mean (d,), S): the maximum-likelihood Gaussian of what was added, with
        :data:`FIT_RIDGE` added to the variances: S the Cholesky factor of the covariance (``full``),
        or the square root of its diagonal."""
        n = float(self.count)
        if n < 2:
            raise ValueError("fitting a Gaussian needs at least 2 latents")
        mean = self.total / n
        if not self.full:
            return mean, torch.sqrt((self.squares / n - mean * mean).clamp_min(0) + FIT_RIDGE)
        covariance = self.squares / n - torch.outer(mean, mean)
        covariance = 0.5 * (covariance + covariance.T)
        covariance.diagonal().add_(FIT_RIDGE)
        factor, info = torch.linalg.cholesky_ex(covariance)
        if int(info) != 0:  # rounding left it indefinite (latents of very different sizes): floor its spectrum
            values, vectors = torch.linalg.eigh(covariance)
            values = values.clamp_min(max(FIT_RIDGE, 1e-12 * float(values.max())))
            factor, info = torch.linalg.cholesky_ex((vectors * values) @ vectors.T)
            if int(info) != 0:  # still not (values beyond float64's range of products): the diagonal
                factor = torch.diag(torch.sqrt(covariance.diagonal().clamp_min(FIT_RIDGE)))
        return mean, factor
