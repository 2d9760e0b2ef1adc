"""The invertible layers of Glow, each with ``forward`` and ``reverse`` side by side.

Conventions: tensors are (N, C, H, W). ``forward(x) -> (y, logdet)`` where ``logdet``
has shape (N,) and is log|det dy/dx| for each sample; ``reverse(y) -> x`` is the exact
inverse. Layers that are not bijections of their input alone (split) say so.
"""
from __future__ import annotations

import contextlib
import itertools
import math
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)


def gaussian_log_density(x: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """Elementwise log N(x; mean, exp(log_std)^2)."""
    return -0.5 * (LOG_2PI + 2.0 * log_std + (x - mean) ** 2 * torch.exp(-2.0 * log_std))


def sum_except_batch(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).sum(dim=1)


# ----------------------------------------------------------------------------- fast path helpers
#
# The fast path (``Glow.fast``, on by default) computes the same mathematics as the layers'
# ``forward``/``reverse`` below with fewer, larger operations: every ActNorm and every
# exp(3 * log_scale) output factor is folded into the neighbouring convolution's weight and bias,
# ActNorm + permutation of a flow step become one 1x1 convolution, tensors are channels_last, and
# the parameter-only tensors are cached between no-grad evaluation calls. The plain ``forward`` /
# ``reverse`` methods stay as the reference ("eager") computation.


def is_compiling() -> bool:
    """True while torch.compile traces (torch >= 2.3 spells it torch.compiler.is_compiling)."""
    check = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if check is None:
        from torch import _dynamo
        check = _dynamo.is_compiling
    return check()


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def gaussian_log_density_sum(x: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """``sum_except_batch(gaussian_log_density(x, mean, log_std))`` in fewer elementwise passes,
    for any memory format: -sum(0.5 * ((x - mean) / std)^2 + log_std) - D/2 log(2 pi)."""
    d = (x - mean) * torch.exp(-log_std)
    per_sample = (0.5 * (d * d) + log_std).sum(dim=(1, 2, 3))
    return -per_sample - 0.5 * LOG_2PI * (x.shape[1] * x.shape[2] * x.shape[3])


def fusion_cache(module: nn.Module, name: str, compute):
    """``compute()`` (a tuple of parameter-only tensors), reused between calls only while the module
    is in eval mode under no-grad/inference mode and none of its parameters or buffers changed
    (same version counter, storage, dtype and device). Any training-mode or grad-enabled call
    drops the cache, so an optimizer step (fused or not) is never followed by a stale read."""
    if is_compiling():  # traced into the graph: recomputed (and fused) by the compiler
        return compute()
    cache = module.__dict__.setdefault("_fusion_cache", {})
    if module.training or torch.is_grad_enabled():
        cache.clear()
        return compute()
    try:
        key = tuple((t._version, t.data_ptr(), t.dtype, t.device)
                    for t in itertools.chain(module.parameters(), module.buffers()))
    except RuntimeError:  # an inference tensor has no version counter: do not cache
        return compute()
    entry = cache.get(name)
    if entry is not None and entry[0] == key:
        return entry[1]
    value = compute()
    cache[name] = (key, value)
    return value


def autocast_off(like: torch.Tensor):
    """A context that suspends autocast (if on) for ``like``'s device: parameter algebra (the
    1x1 convolution's P L U product, folded biases) must not drop to bf16."""
    if _autocast_enabled(like.device.type):
        return torch.autocast(like.device.type, enabled=False)
    return contextlib.nullcontext()


def full_precision_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], padding: int = 0) -> torch.Tensor:
    """``F.conv2d`` outside any autocast region: under bf16 autocast the flow's own maps (ActNorm +
    permutation, split priors) stay in the input's precision; only the coupling networks drop."""
    if _autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return F.conv2d(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), padding=padding)
    return F.conv2d(x, weight, bias, padding=padding)


def channels_last_squeeze2x(x: torch.Tensor) -> torch.Tensor:
    """:func:`squeeze2x` whose output is channels_last (same values, one copy)."""
    n, c, h, w = x.shape
    x = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, h // 2, w // 2, c * 4).permute(0, 3, 1, 2)


def channels_last_unsqueeze2x(x: torch.Tensor) -> torch.Tensor:
    """:func:`unsqueeze2x` whose output is channels_last (same values, one copy)."""
    n, c, h, w = x.shape
    x = x.permute(0, 2, 3, 1).reshape(n, h, w, c // 4, 2, 2).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(n, h * 2, w * 2, c // 4).permute(0, 3, 1, 2)


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

    def is_initialized(self) -> bool:
        """``bool(self.initialized)`` without a host-device synchronisation once it has been seen
        true: the answer is remembered for the buffer's current version (any write to the buffer,
        load_state_dict included, bumps it)."""
        if is_compiling():
            return True  # speed.compile_model only compiles initialised models
        try:
            version = self.initialized._version
        except RuntimeError:  # an inference tensor: no version counter, read the value
            return bool(self.initialized)
        if self.__dict__.get("_seen_initialized") != version:
            if not bool(self.initialized):
                return False
            self.__dict__["_seen_initialized"] = version
        return True

    def scale_and_shift(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(exp(log_scale), bias * exp(log_scale)), each (C,): y = x * scale + shift."""
        scale = torch.exp(self.log_scale).flatten()
        return scale, self.bias.flatten() * scale


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
    """Convolution ('same' padding, no bias) followed by ActNorm; used inside coupling networks."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, actnorm_scale: float):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        nn.init.normal_(self.conv.weight, 0.0, 0.05)
        self.actnorm = ActNorm(out_channels, actnorm_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.actnorm(self.conv(x))[0]

    def fused_weight_and_bias(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(W', b') with conv(x, W') + b' = ActNorm(conv(x, W)): (conv + bias) * s = conv(W * s) + bias * s."""
        scale, shift = self.actnorm.scale_and_shift()
        return self.conv.weight * scale[:, None, None, None], shift


class ZeroConv2d(nn.Module):
    """Zero-initialised 3x3 convolution whose output is multiplied by exp(3 * log_scale).

    At initialisation it outputs zeros, so a coupling starts as the identity and a learned
    prior starts as a standard normal.
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

    def fused_weight_and_bias(self, deinterleave: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """(W', b') with conv(x, W') + b' = forward(x). ``deinterleave`` reorders the output
        channels (0, 2, 4, ..., 1, 3, 5, ...), so that forward(x)[:, 0::2] and [:, 1::2] become the
        first and the second half."""
        scale = torch.exp(self.log_scale * self.log_scale_factor).flatten()
        weight = self.conv.weight * scale[:, None, None, None]
        bias = self.conv.bias * scale
        if deinterleave:  # (2k, ...) -> (k, 2, ...) -> (2, k, ...): even channels, then odd ones
            weight = weight.unflatten(0, (-1, 2)).transpose(0, 1).flatten(0, 1)
            bias = bias.unflatten(0, (-1, 2)).transpose(0, 1).flatten(0, 1)
        return weight, bias


class ZeroLinear(nn.Module):
    """Zero-initialised linear layer with the same exp(3 * log_scale) output factor."""

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
    Affine: shift, raw = NN(x_a) (interleaved channels); scale = sigmoid(raw + 2);
    y_b = (x_b + shift) * scale; log-det sum(log scale).
    y_a = x_a in both. Shapes: (N, C, H, W) -> (N, C, H, W).
    """

    def __init__(self, num_channels: int, hidden_channels: int, affine: bool, actnorm_scale: float):
        super().__init__()
        self.affine = affine
        self.split = num_channels // 2
        out = num_channels - self.split
        self.net = coupling_network(self.split, 2 * out if affine else out, hidden_channels, actnorm_scale)

    def _shift_scale(self, x_a: torch.Tensor):
        h = self.net(x_a)
        if not self.affine:
            return h, None
        shift, raw = h[:, 0::2], h[:, 1::2]
        return shift, torch.sigmoid(raw + 2.0)

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

    # -- fast path: the same maps, ActNorms and output factor folded into the convolutions

    def fused_params(self) -> Tuple[torch.Tensor, ...]:
        """(W1, b1, W2, b2, W3, b3): the network as three biased convolutions. For an affine
        coupling W3/b3 output [shift, raw + 2] as two contiguous halves (the +2 is in b3)."""
        w1, b1 = self.net[0].fused_weight_and_bias()
        w2, b2 = self.net[2].fused_weight_and_bias()
        w3, b3 = self.net[4].fused_weight_and_bias(deinterleave=self.affine)
        if self.affine:
            b3 = torch.cat([b3[: b3.shape[0] // 2], b3[b3.shape[0] // 2 :] + 2.0])
        return w1, b1, w2, b2, w3, b3

    def _fast_net(self, x_a: torch.Tensor, params) -> torch.Tensor:
        w1, b1, w2, b2, w3, b3 = params
        h = F.conv2d(x_a, w1, b1, padding=w1.shape[-1] // 2).relu_()
        h = F.conv2d(h, w2, b2, padding=w2.shape[-1] // 2).relu_()
        # under autocast the network's output is bf16: the coupling's own arithmetic and its
        # log-det use the flow's precision
        return F.conv2d(h, w3, b3, padding=1).to(x_a.dtype)

    def fast_forward(self, x: torch.Tensor, params, inplace: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """:meth:`forward` from :meth:`fused_params`; log-det None for additive (zero).
        ``inplace``: x is a scratch tensor of the caller's and no gradient is recorded, so y_b
        overwrites x_b."""
        # split/chunk rather than slicing: their backward is a cat, which keeps the gradient's
        # memory format (a slice's backward scatters into a contiguous zero tensor, and mixed
        # formats make the convolution and ReLU backward passes several times slower)
        x_a, x_b = x.split([self.split, x.shape[1] - self.split], dim=1)
        h = self._fast_net(x_a, params)
        if not self.affine:
            if inplace:
                x_b.add_(h)
                return x, None
            return torch.cat([x_a, x_b + h], dim=1), None
        shift, raw = h.chunk(2, dim=1)
        # log sigmoid(raw) = -softplus(-raw), stable (logsigmoid's backward would return a
        # contiguous-format gradient, see above)
        logdet = -F.softplus(-raw).sum(dim=(1, 2, 3))
        if inplace:
            x_b.add_(shift).mul_(raw.sigmoid_())
            return x, logdet
        return torch.cat([x_a, (x_b + shift) * torch.sigmoid(raw)], dim=1), logdet

    def fast_reverse(self, y: torch.Tensor, params, inplace: bool) -> torch.Tensor:
        """:meth:`reverse` from :meth:`fused_params` (``inplace`` as in :meth:`fast_forward`)."""
        y_a, y_b = y.split([self.split, y.shape[1] - self.split], dim=1)
        h = self._fast_net(y_a, params)
        if not self.affine:
            if inplace:
                y_b.sub_(h)
                return y
            return torch.cat([y_a, y_b - h], dim=1)
        shift, raw = h.chunk(2, dim=1)
        if inplace:
            y_b.div_(raw.sigmoid_()).sub_(shift)
            return y
        return torch.cat([y_a, y_b / torch.sigmoid(raw) - shift], dim=1)


class FlowStep(nn.Module):
    """One step of flow: ActNorm -> permutation (1x1 conv / shuffle / reverse) -> coupling.

    Shapes: (N, C, H, W) -> (N, C, H, W). log-det: the sum of the three layers'.
    """

    def __init__(self, num_channels: int, hidden_channels: int, actnorm_scale: float,
                 flow_permutation: str, flow_coupling: str, LU_decomposed: bool):
        super().__init__()
        self.actnorm = ActNorm(num_channels, actnorm_scale)
        if flow_permutation == "invconv":
            self.permute = InvConv1x1(num_channels, LU_decomposed)
        else:
            self.permute = Permute(num_channels, shuffle=flow_permutation == "shuffle")
        self.coupling = Coupling(num_channels, hidden_channels, flow_coupling == "affine", actnorm_scale)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x, logdet = self.actnorm(x)
        x, ld = self.permute(x)
        logdet = logdet + ld
        x, ld = self.coupling(x)
        return x, logdet + ld

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        y = self.coupling.reverse(y)
        y = self.permute.reverse(y)
        return self.actnorm.reverse(y)

    # -- fast path: ActNorm + permutation as one biased 1x1 convolution, then the fused coupling

    def is_initialized(self) -> bool:
        return all(m.is_initialized() for m in (self.actnorm, self.coupling.net[0].actnorm,
                                                self.coupling.net[2].actnorm))

    def _mixing_matrix(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(M, log|det M|): the permutation layer as a (C, C) matrix, y = M x."""
        if isinstance(self.permute, InvConv1x1):
            return self.permute.weight_and_logdet()
        log_scale = self.actnorm.log_scale
        eye = torch.eye(log_scale.shape[1], dtype=log_scale.dtype, device=log_scale.device)
        return eye[self.permute.indices], log_scale.new_zeros(())

    def fused_params(self):
        """((W, b), log|det| per pixel, coupling params): ActNorm then permutation is
        y = M ((x + bias) * s) = (M diag(s)) x + M (bias * s)."""
        def compute():
            with autocast_off(self.actnorm.log_scale):
                scale, shift = self.actnorm.scale_and_shift()
                matrix, matrix_logdet = self._mixing_matrix()
                weight = (matrix * scale)[:, :, None, None]
                bias = matrix @ shift
                return weight, bias, self.actnorm.log_scale.sum() + matrix_logdet, self.coupling.fused_params()
        return fusion_cache(self, "forward", compute)

    def fused_inverse(self):
        """(W, b) with x = conv(y', W) + b inverting ActNorm + permutation:
        x = diag(1/s) M^-1 y' - bias. M^-1 is computed in float64 (as InvConv1x1.reverse)."""
        def compute():
            with autocast_off(self.actnorm.log_scale):
                return self._inverse_weight_and_bias()
        return fusion_cache(self, "reverse", compute)

    def _inverse_weight_and_bias(self) -> Tuple[torch.Tensor, torch.Tensor]:
        matrix, _ = self._mixing_matrix()
        if isinstance(self.permute, InvConv1x1):
            inverse = torch.linalg.inv_ex(matrix.double()).inverse  # _ex: no host sync on CUDA
        else:
            inverse = matrix.double().T
        inverse = inverse * torch.exp(-self.actnorm.log_scale.double()).flatten()[:, None]
        return inverse.to(matrix.dtype)[:, :, None, None], -self.actnorm.bias.flatten()

    def fast_forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(y, log-det per pixel (scalar; times H*W gives the ActNorm + permutation part),
        coupling log-det (N,) or None): the three layers' :meth:`forward`, fused. Needs
        initialised ActNorms."""
        weight, bias, pixel_logdet, coupling_params = self.fused_params()
        y = full_precision_conv(x, weight, bias)  # a fresh tensor: the coupling may overwrite it
        inplace = not torch.is_grad_enabled() and not is_compiling()
        y, coupling_logdet = self.coupling.fast_forward(y, coupling_params, inplace)
        return y, pixel_logdet, coupling_logdet

    def fast_reverse(self, y: torch.Tensor, inplace: bool) -> torch.Tensor:
        """:meth:`reverse`, fused; ``inplace``: y is the caller's scratch tensor (no gradient)."""
        _, _, _, coupling_params = self.fused_params()
        weight, bias = self.fused_inverse()
        y = self.coupling.fast_reverse(y, coupling_params, inplace)
        return full_precision_conv(y, weight, bias)


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
    """

    def __init__(self, num_channels: int):
        super().__init__()
        self.keep = num_channels // 2
        self.prior = ZeroConv2d(self.keep, 2 * (num_channels - self.keep))

    def mean_log_std(self, x_a: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h = self.prior(x_a)
        return h[:, 0::2], h[:, 1::2]

    def forward(self, x: torch.Tensor):
        x_a, z = x[:, : self.keep], x[:, self.keep :]
        mean, log_std = self.mean_log_std(x_a)
        return x_a, z, sum_except_batch(gaussian_log_density(z, mean, log_std))

    def reverse(self, x_a: torch.Tensor, z: Optional[torch.Tensor] = None, temperature: float = 1.0) -> torch.Tensor:
        if z is None:
            mean, log_std = self.mean_log_std(x_a)
            z = mean + temperature * torch.exp(log_std) * torch.randn_like(mean)
        return torch.cat([x_a, z], dim=1)

    # -- fast path

    def fused_params(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return fusion_cache(self, "prior", lambda: self.prior.fused_weight_and_bias(deinterleave=True))

    def _fast_mean_log_std(self, x_a: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        weight, bias = self.fused_params()
        mean, log_std = full_precision_conv(x_a, weight, bias, padding=1).chunk(2, dim=1)
        return mean, log_std

    def fast_forward(self, x: torch.Tensor):
        """:meth:`forward` with the fused prior convolution."""
        x_a, z = x.split([self.keep, x.shape[1] - self.keep], dim=1)
        mean, log_std = self._fast_mean_log_std(x_a)
        return x_a, z, gaussian_log_density_sum(z, mean, log_std)

    def fast_reverse(self, x_a: torch.Tensor, z: Optional[torch.Tensor] = None, temperature: float = 1.0) -> torch.Tensor:
        """:meth:`reverse` with the fused prior convolution; draws the same random numbers."""
        if z is None:
            mean, log_std = self._fast_mean_log_std(x_a)
            noise = torch.randn(mean.shape, dtype=mean.dtype, device=mean.device)  # as randn_like of a strided view
            z = mean + temperature * torch.exp(log_std) * noise
        return torch.cat([x_a, z], dim=1)
