"""The reference mathematics of Glow: each layer's ``forward`` and ``reverse`` side by side.

Conventions: tensors are (N, C, H, W). ``forward(x) -> (y, logdet)`` where ``logdet`` has shape
(N,) and is log|det dy/dx| for each sample; ``reverse(y) -> x`` is the exact inverse. Layers that
are not bijections of their input alone (the split) say so. This is the plain computation the
tests check against brute-force Jacobians; glowflow/fused.py computes the same maps faster.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from glowflow.latent_fit import fitted_gaussian, prior_draw, prior_log_density

LOG_2PI = math.log(2 * math.pi)


def gaussian_log_density(x: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """Elementwise log N(x; mean, exp(log_std)^2)."""
    return -0.5 * (LOG_2PI + 2.0 * log_std + (x - mean) ** 2 * torch.exp(-2.0 * log_std))


def sum_except_batch(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).sum(dim=1)


# ----------------------------------------------------------------------------- ActNorm


class ActNorm(nn.Module):
    """Per-channel affine map ``y = (x + bias) * exp(log_scale)`` with data-dependent init.

    On the first forward pass while ``initialized`` is 0, ``bias`` and ``log_scale`` are set
    so that the batch's per-channel output has mean 0 and std ``scale`` (averaged over all
    processes when torch.distributed is initialised, so every rank starts identical).
    ``initialized`` is a buffer: a loaded model never re-initialises.

    Shapes: (N, C, H, W) -> (N, C, H, W). log-det: H * W * sum(log_scale).
    """

    def __init__(self, num_channels: int, scale: float = 1.0):
        super().__init__()
        self.scale = float(scale)
        self.bias = nn.Parameter(torch.zeros(1, num_channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, num_channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        mean_sq = (x * x).mean(dim=(0, 2, 3), keepdim=True)
        if dist.is_available() and dist.is_initialized():
            stats = torch.cat([mean, mean_sq])
            dist.all_reduce(stats)
            stats /= dist.get_world_size()
            mean, mean_sq = stats[:1], stats[1:]
        std = (mean_sq - mean * mean).clamp_min(0).sqrt()
        self.bias.copy_(-mean)
        self.log_scale.copy_(torch.log(self.scale / (std + 1e-6)))
        self.initialized.fill_(1)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if not self.initialized and self.training:
            self.initialize(x)
        y = (x + self.bias) * torch.exp(self.log_scale)
        logdet = x.shape[2] * x.shape[3] * self.log_scale.sum()
        return y, logdet.expand(x.shape[0])

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * torch.exp(-self.log_scale) - self.bias


# ----------------------------------------------------------------------------- permutations


class InvConv1x1(nn.Module):
    """Invertible 1x1 convolution ``y[:, i] = sum_j W[i, j] x[:, j]`` (Glow, section 3.2).

    Plain: W is a free (C, C) matrix; log-det H * W * log|det W|.
    LU: W = P @ L @ (U + diag(sign_s * exp(log_s))) with P a fixed permutation, L unit lower
    triangular, U strictly upper triangular, sign_s fixed; log-det H * W * sum(log_s).
    Both start from a random orthogonal matrix (``torch.linalg.qr``).

    Shapes: (N, C, H, W) -> (N, C, H, W).
    """

    def __init__(self, num_channels: int, LU_decomposed: bool = False):
        super().__init__()
        self.LU_decomposed = LU_decomposed
        q, _ = torch.linalg.qr(torch.randn(num_channels, num_channels))
        if not LU_decomposed:
            self.weight = nn.Parameter(q)
            return
        p, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper)
        self.register_buffer("p", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.register_buffer("lower_mask", torch.tril(torch.ones(num_channels, num_channels), -1))
        self.register_buffer("eye", torch.eye(num_channels))
        self.lower = nn.Parameter(lower)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(torch.abs(s)))

    def weight_and_logdet(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(W, log|det W|) for the current parameters, computed once per call."""
        if not self.LU_decomposed:
            return self.weight, torch.linalg.slogdet(self.weight)[1]
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.p @ lower @ upper, self.log_s.sum()

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        weight, logdet = self.weight_and_logdet()
        y = F.conv2d(x, weight[:, :, None, None])
        return y, (x.shape[2] * x.shape[3] * logdet).expand(x.shape[0])

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        weight, _ = self.weight_and_logdet()
        # Invert in float64: a float32 inverse of a moderately conditioned W costs ~1e-5 per layer.
        inverse = torch.linalg.inv(weight.double()).to(weight.dtype)
        return F.conv2d(y, inverse[:, :, None, None])


class Permute(nn.Module):
    """Fixed channel permutation: 'reverse' (C-1, ..., 0) or 'shuffle' (random, saved as a buffer).

    Shapes: (N, C, H, W) -> (N, C, H, W). log-det: 0.
    """

    def __init__(self, num_channels: int, shuffle: bool):
        super().__init__()
        if shuffle:
            indices = torch.randperm(num_channels)
        else:
            indices = torch.arange(num_channels - 1, -1, -1)
        self.register_buffer("indices", indices)
        self.register_buffer("inverse_indices", torch.argsort(indices))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return x[:, self.indices], x.new_zeros(x.shape[0])

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        return y[:, self.inverse_indices]


# ----------------------------------------------------------------------------- coupling


class Conv2dActNorm(nn.Module):
    """Convolution ('same' padding, no bias) followed by ActNorm; used inside coupling networks
    (not a bijection: no log-det). Shapes: (N, C_in, H, W) -> (N, C_out, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, actnorm_scale: float):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        nn.init.normal_(self.conv.weight, 0.0, 0.05)
        self.actnorm = ActNorm(out_channels, actnorm_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.actnorm(self.conv(x))[0]


class ZeroConv2d(nn.Module):
    """Zero-initialised 3x3 convolution whose output is multiplied by exp(3 * log_scale).

    At initialisation it outputs zeros, so a coupling starts as the identity and a learned
    prior starts as a standard normal. Shapes: (N, C_in, H, W) -> (N, C_out, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, log_scale_factor: float = 3.0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.log_scale = nn.Parameter(torch.zeros(1, out_channels, 1, 1))
        self.log_scale_factor = log_scale_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * torch.exp(self.log_scale * self.log_scale_factor)


class ZeroLinear(nn.Module):
    """Zero-initialised linear layer with the same exp(3 * log_scale) output factor: (N, in) -> (N, out)."""

    def __init__(self, in_features: int, out_features: int, log_scale_factor: float = 3.0):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.log_scale = nn.Parameter(torch.zeros(out_features))
        self.log_scale_factor = log_scale_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * torch.exp(self.log_scale * self.log_scale_factor)


def coupling_network(in_channels: int, out_channels: int, hidden_channels: int, actnorm_scale: float) -> nn.Sequential:
    """3x3 conv + ActNorm + ReLU, 1x1 conv + ActNorm + ReLU, zero-initialised 3x3 conv."""
    return nn.Sequential(
        Conv2dActNorm(in_channels, hidden_channels, 3, actnorm_scale),
        nn.ReLU(),
        Conv2dActNorm(hidden_channels, hidden_channels, 1, actnorm_scale),
        nn.ReLU(),
        ZeroConv2d(hidden_channels, out_channels),
    )


class Coupling(nn.Module):
    """Additive or affine coupling. x = [x_a, x_b] split on channels (x_a the first C//2).

    Additive: y_b = x_b + NN(x_a); log-det 0.
    Affine: shift, raw = NN(x_a) (interleaved channels); scale = sigmoid(raw + 2), or with
    ``scale_min`` > 0, scale_min + (1 - scale_min) * sigmoid(raw + 2);
    y_b = (x_b + shift) * scale; log-det sum(log scale).
    y_a = x_a in both. Shapes: (N, C, H, W) -> (N, C, H, W).
    """

    def __init__(
        self, num_channels: int, hidden_channels: int, affine: bool, actnorm_scale: float, scale_min: float = 0.0
    ):
        super().__init__()
        self.affine = affine
        self.scale_min = float(scale_min)
        self.split = num_channels // 2
        out = num_channels - self.split
        self.net = coupling_network(self.split, 2 * out if affine else out, hidden_channels, actnorm_scale)

    def _shift_scale(self, x_a: torch.Tensor):
        h = self.net(x_a)
        if not self.affine:
            return h, None
        shift, raw = h[:, 0::2], h[:, 1::2]
        scale = torch.sigmoid(raw + 2.0)
        if self.scale_min:
            scale = self.scale_min + (1.0 - self.scale_min) * scale
        return shift, scale

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x_a, x_b = x[:, : self.split], x[:, self.split :]
        shift, scale = self._shift_scale(x_a)
        if scale is None:
            return torch.cat([x_a, x_b + shift], dim=1), x.new_zeros(x.shape[0])
        y_b = (x_b + shift) * scale
        return torch.cat([x_a, y_b], dim=1), sum_except_batch(torch.log(scale))

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        y_a, y_b = y[:, : self.split], y[:, self.split :]
        shift, scale = self._shift_scale(y_a)
        x_b = y_b - shift if scale is None else y_b / scale - shift
        return torch.cat([y_a, x_b], dim=1)


class FlowStep(nn.Module):
    """One step of flow: ActNorm -> permutation (1x1 conv / shuffle / reverse) -> coupling.

    Shapes: (N, C, H, W) -> (N, C, H, W). log-det: the sum of the three layers'.
    """

    def __init__(
        self,
        num_channels: int,
        hidden_channels: int,
        actnorm_scale: float,
        flow_permutation: str,
        flow_coupling: str,
        LU_decomposed: bool,
        coupling_scale_min: float = 0.0,
    ):
        super().__init__()
        self.actnorm = ActNorm(num_channels, actnorm_scale)
        if flow_permutation == "invconv":
            self.permute = InvConv1x1(num_channels, LU_decomposed)
        else:
            self.permute = Permute(num_channels, shuffle=flow_permutation == "shuffle")
        self.coupling = Coupling(
            num_channels, hidden_channels, flow_coupling == "affine", actnorm_scale, coupling_scale_min
        )

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x, logdet = self.actnorm(x)
        x, ld = self.permute(x)
        logdet = logdet + ld
        x, ld = self.coupling(x)
        return x, logdet + ld

    def is_initialized(self) -> bool:
        """True once the step's three ActNorms (its own and the coupling network's two) are initialised."""
        return all(bool(m.initialized) for m in self.modules() if isinstance(m, ActNorm))

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        y = self.coupling.reverse(y)
        y = self.permute.reverse(y)
        return self.actnorm.reverse(y)


# ----------------------------------------------------------------------------- squeeze, split


def squeeze2x(x: torch.Tensor) -> torch.Tensor:
    """Space to depth: (N, C, H, W) -> (N, 4C, H/2, W/2); a permutation, log-det 0."""
    n, c, h, w = x.shape
    x = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(n, c * 4, h // 2, w // 2)


def unsqueeze2x(x: torch.Tensor) -> torch.Tensor:
    """Depth to space, the inverse of :func:`squeeze2x`: (N, 4C, H, W) -> (N, C, 2H, 2W)."""
    n, c, h, w = x.shape
    x = x.view(n, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(n, c // 4, h * 2, w * 2)


class SplitPrior(nn.Module):
    """Split off half the channels as a latent with a Gaussian prior conditioned on the rest.

    forward: x (N, C, H, W) -> kept x_a (N, C//2, H, W) and latent z (N, C - C//2, H, W),
    plus log p(z | x_a) of shape (N,). The split itself is a coordinate projection (log-det 0):
    the pair (x_a, z) is a bijection of x.
    reverse: (x_a, z or None, temperature) -> x; a missing z is drawn from the prior with its
    std scaled by ``temperature`` (temperature 0 gives the prior mean).

    The prior: z = mean(x_a) + std(x_a) e, with e ~ N(0, I) (the paper's), or with ``fit``
    ('full' or 'diag', for a latent of ``latent_hw`` = (H, W)) e ~ ``self.gaussian``, a
    :class:`glowflow.latent_fit.LatentGaussian` (the identity until fitted).
    """

    def __init__(self, num_channels: int, fit: str = "none", latent_hw: Optional[Tuple[int, int]] = None):
        super().__init__()
        self.keep = num_channels // 2
        self.prior = ZeroConv2d(self.keep, 2 * (num_channels - self.keep))
        if fit != "none" and latent_hw is None:
            raise ValueError("a fitted split prior needs the latent's height and width")
        self.gaussian = fitted_gaussian((num_channels - self.keep, *(latent_hw or (0, 0))), fit)

    def mean_log_std(self, x_a: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h = self.prior(x_a)
        return h[:, 0::2], h[:, 1::2]

    def split(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(x_a, z): the kept half and the latent, without the prior."""
        return x[:, : self.keep], x[:, self.keep :]

    def standardise(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(x_a, e): the kept half and the latent standardised by the paper's prior,
        e = (z - mean(x_a)) / std(x_a) (what the fitted Gaussian models)."""
        x_a, z = self.split(x)
        mean, log_std = self.mean_log_std(x_a)
        return x_a, (z - mean) * torch.exp(-log_std)

    def forward(self, x: torch.Tensor):
        x_a, z = self.split(x)
        mean, log_std = self.mean_log_std(x_a)
        log_p = sum_except_batch(gaussian_log_density(z, mean, log_std))
        return x_a, z, prior_log_density(log_p, self.gaussian, z, mean, log_std)

    def reverse(self, x_a: torch.Tensor, z: Optional[torch.Tensor] = None, temperature: float = 1.0) -> torch.Tensor:
        if z is None:
            mean, log_std = self.mean_log_std(x_a)
            z = prior_draw(self.gaussian, mean, log_std, torch.randn_like(mean), temperature)
        return torch.cat([x_a, z], dim=1)
