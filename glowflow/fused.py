"""The fast path: the mathematics of glowflow/layers.py with fewer, larger operations.

Every ActNorm and every ``exp(3 * log_scale)`` output factor is folded into the neighbouring
convolution's weight and bias, a flow step's ActNorm + permutation become one biased 1x1
convolution, activations stay channels_last, and, in evaluation, the parameter-only tensors
(folded weights, W^-1, log|det W|) are kept in a :class:`FusionCache`. :class:`FusedFlowStep` and
:class:`FusedSplitPrior` wrap a layer of glowflow/layers.py and keep its contract
(``forward(x) -> (y, logdet (N,))``, ``reverse``), so the model runs one loop over either kind.
Under bf16 autocast only the coupling networks drop to bf16: the flow's own maps, every
log-determinant and every prior stay in the input's precision.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from glowflow.latent_fit import prior_draw, prior_log_density
from glowflow.layers import LOG_2PI, ActNorm, Coupling, FlowStep, InvConv1x1, SplitPrior, squeeze2x, unsqueeze2x

Params = Tuple[torch.Tensor, ...]


# ----------------------------------------------------------------------------- helpers


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


def autocast_off(like: torch.Tensor):
    """A context that suspends autocast (if on) for ``like``'s device: parameter algebra (the
    1x1 convolution's P L U product, folded biases, priors) must not drop to bf16."""
    if _autocast_enabled(like.device.type):
        return torch.autocast(like.device.type, enabled=False)
    return contextlib.nullcontext()


def full_precision_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], padding: int = 0
) -> torch.Tensor:
    """``F.conv2d`` outside any autocast region: under bf16 autocast the flow's own maps (ActNorm +
    permutation, split priors) stay in the input's precision; only the coupling networks drop."""
    if _autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return F.conv2d(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), padding=padding)
    return F.conv2d(x, weight, bias, padding=padding)


def gaussian_log_density_sum(x: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """Per-sample sum (N,) of log N(x; mean, exp(log_std)^2) over (C, H, W), in fewer elementwise
    passes than the plain form, for any memory format: -sum(0.5 ((x - mean) / std)^2 + log_std)
    - D/2 log(2 pi)."""
    d = (x - mean) * torch.exp(-log_std)
    per_sample = (0.5 * (d * d) + log_std).sum(dim=(1, 2, 3))
    return -per_sample - 0.5 * LOG_2PI * (x.shape[1] * x.shape[2] * x.shape[3])


def channels_last_squeeze2x(x: torch.Tensor) -> torch.Tensor:
    """Space to depth, (N, C, H, W) -> (N, 4C, H/2, W/2), as layers.squeeze2x, with a
    channels_last result (same values, one copy)."""
    n, c, h, w = x.shape
    x = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, h // 2, w // 2, c * 4).permute(0, 3, 1, 2)


def channels_last_unsqueeze2x(x: torch.Tensor) -> torch.Tensor:
    """Depth to space, (N, 4C, H, W) -> (N, C, 2H, 2W), as layers.unsqueeze2x, channels_last."""
    n, c, h, w = x.shape
    x = x.permute(0, 2, 3, 1).reshape(n, h, w, c // 4, 2, 2).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(n, h * 2, w * 2, c // 4).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------- the cache


class FusionCache:
    """Parameter-only tensors of the fast path, reused between evaluation calls.

    An entry is served only while its module is in eval mode under no-grad or inference mode and
    none of the module's parameters or buffers changed (same version counter, storage, dtype and
    device), so an optimizer step, ``load_state_dict`` or an in-place edit is never followed by a
    stale read. :meth:`clear` empties it; ``Glow.train()``, ``Glow.eval()``,
    ``Glow.load_state_dict`` and moving the model call it.
    """

    def __init__(self):
        self._entries: Dict[Tuple[int, str], Tuple[tuple, Params]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def get(self, owner: nn.Module, name: str, compute: Callable[[], Params]) -> Params:
        """``compute()``, or its value from an earlier call for the same ``owner``'s unchanged tensors."""
        if is_compiling():  # traced into the graph: recomputed (and fused) by the compiler
            return compute()
        if owner.training or torch.is_grad_enabled():
            return compute()
        try:
            key = tuple(
                (t._version, t.data_ptr(), t.dtype, t.device)
                for t in itertools.chain(owner.parameters(), owner.buffers())
            )
        except RuntimeError:  # an inference tensor has no version counter: do not cache
            return compute()
        entry = self._entries.get((id(owner), name))
        if entry is not None and entry[0] == key:
            return entry[1]
        value = compute()
        self._entries[(id(owner), name)] = (key, value)
        return value


# ----------------------------------------------------------------------------- folding


def actnorm_scale_shift(actnorm: ActNorm) -> Tuple[torch.Tensor, torch.Tensor]:
    """(exp(log_scale), bias * exp(log_scale)), each (C,): ActNorm is y = x * scale + shift."""
    scale = torch.exp(actnorm.log_scale).flatten()
    return scale, actnorm.bias.flatten() * scale


def folded_conv_actnorm(layer: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """(W', b') with conv(x, W') + b' = layers.Conv2dActNorm(x):
    (conv + bias) * s = conv(W * s) + bias * s."""
    scale, shift = actnorm_scale_shift(layer.actnorm)
    return layer.conv.weight * scale[:, None, None, None], shift


def folded_zero_conv(layer: nn.Module, deinterleave: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """(W', b') with conv(x, W') + b' = layers.ZeroConv2d(x). ``deinterleave`` reorders the output
    channels (0, 2, 4, ..., 1, 3, 5, ...), so that forward(x)[:, 0::2] and [:, 1::2] become the
    first and the second half."""
    scale = torch.exp(layer.log_scale * layer.log_scale_factor).flatten()
    weight = layer.conv.weight * scale[:, None, None, None]
    bias = layer.conv.bias * scale
    if deinterleave:  # (2k, ...) -> (k, 2, ...) -> (2, k, ...): even channels, then odd ones
        weight = weight.unflatten(0, (-1, 2)).transpose(0, 1).flatten(0, 1)
        bias = bias.unflatten(0, (-1, 2)).transpose(0, 1).flatten(0, 1)
    return weight, bias


def folded_coupling_network(coupling: Coupling) -> Params:
    """(W1, b1, W2, b2, W3, b3): the coupling network as three biased convolutions. For an affine
    coupling W3/b3 output [shift, raw + 2] as two contiguous halves (the +2 is in b3)."""
    w1, b1 = folded_conv_actnorm(coupling.net[0])
    w2, b2 = folded_conv_actnorm(coupling.net[2])
    w3, b3 = folded_zero_conv(coupling.net[4], deinterleave=coupling.affine)
    if coupling.affine:
        b3 = torch.cat([b3[: b3.shape[0] // 2], b3[b3.shape[0] // 2 :] + 2.0])
    return w1, b1, w2, b2, w3, b3


def mixing_matrix(step: FlowStep) -> Tuple[torch.Tensor, torch.Tensor]:
    """(M, log|det M|): the step's permutation layer as a (C, C) matrix, y = M x."""
    if isinstance(step.permute, InvConv1x1):
        return step.permute.weight_and_logdet()
    log_scale = step.actnorm.log_scale
    eye = torch.eye(log_scale.shape[1], dtype=log_scale.dtype, device=log_scale.device)
    return eye[step.permute.indices], log_scale.new_zeros(())


# ----------------------------------------------------------------------------- a fused flow step


class FusedFlowStep:
    """A :class:`glowflow.layers.FlowStep` computed fused: ActNorm + permutation as one biased
    1x1 convolution, then the coupling network as three biased convolutions.

    forward: (N, C, H, W) -> (y, log-det (N,)), as ``FlowStep.forward``; a step whose ActNorms
    are not initialised yet runs the plain forward (which initialises them in training mode).
    reverse: ``FlowStep.reverse``; with gradients off it overwrites its input (the model's
    ``decode`` hands it a private copy).
    """

    def __init__(self, step: FlowStep, cache: FusionCache):
        self.step, self.cache = step, cache
        self._actnorms = (step.actnorm, step.coupling.net[0].actnorm, step.coupling.net[2].actnorm)
        self._ready_versions: Optional[tuple] = None

    def is_initialized(self) -> bool:
        """True once the step's ActNorms are initialised. Remembered for the buffers' current
        versions (any write bumps them), so a GPU is not synchronised on every call."""
        if is_compiling():
            return True  # runtime.compile_model only compiles initialised models
        try:
            versions = tuple(a.initialized._version for a in self._actnorms)
        except RuntimeError:  # inference tensors: no version counter, read the values
            return all(bool(a.initialized) for a in self._actnorms)
        if versions != self._ready_versions:
            if not all(bool(a.initialized) for a in self._actnorms):
                return False
            self._ready_versions = versions
        return True

    def params(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Params]:
        """(W, b, log|det| per pixel, coupling network): ActNorm then permutation is
        y = M ((x + bias) * s) = (M diag(s)) x + M (bias * s)."""

        def compute():
            with autocast_off(self.step.actnorm.log_scale):
                scale, shift = actnorm_scale_shift(self.step.actnorm)
                matrix, matrix_logdet = mixing_matrix(self.step)
                weight = (matrix * scale)[:, :, None, None]
                bias = matrix @ shift
                pixel_logdet = self.step.actnorm.log_scale.sum() + matrix_logdet
                return weight, bias, pixel_logdet, folded_coupling_network(self.step.coupling)

        return self.cache.get(self.step, "forward", compute)

    def inverse_params(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(W, b) with x = conv(y', W) + b inverting ActNorm + permutation:
        x = diag(1/s) M^-1 y' - bias. M^-1 is computed in float64 (as InvConv1x1.reverse)."""

        def compute():
            with autocast_off(self.step.actnorm.log_scale):
                matrix, _ = mixing_matrix(self.step)
                if isinstance(self.step.permute, InvConv1x1):
                    inverse = torch.linalg.inv_ex(matrix.double()).inverse  # _ex: no host sync on CUDA
                else:
                    inverse = matrix.double().T
                inverse = inverse * torch.exp(-self.step.actnorm.log_scale.double()).flatten()[:, None]
                return inverse.to(matrix.dtype)[:, :, None, None], -self.step.actnorm.bias.flatten()

        return self.cache.get(self.step, "reverse", compute)

    def __call__(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.forward(x)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized():
            return self.step(x)
        weight, bias, pixel_logdet, network = self.params()
        y = full_precision_conv(x, weight, bias)  # a fresh tensor: the coupling may overwrite it
        scratch = not torch.is_grad_enabled() and not is_compiling()
        y, coupling_logdet = _coupling_forward(self.step.coupling, y, network, scratch)
        logdet = (y.shape[2] * y.shape[3] * pixel_logdet).expand(y.shape[0])
        return y, logdet if coupling_logdet is None else logdet + coupling_logdet

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        _, _, _, network = self.params()
        weight, bias = self.inverse_params()
        scratch = not torch.is_grad_enabled() and not is_compiling()
        y = _coupling_reverse(self.step.coupling, y, network, scratch)
        return full_precision_conv(y, weight, bias)


def _coupling_network(x_a: torch.Tensor, network: Params) -> torch.Tensor:
    w1, b1, w2, b2, w3, b3 = network
    h = F.conv2d(x_a, w1, b1, padding=w1.shape[-1] // 2).relu_()
    h = F.conv2d(h, w2, b2, padding=w2.shape[-1] // 2).relu_()
    # under autocast the network's output is bf16: the coupling's own arithmetic and its log-det
    # use the flow's precision
    return F.conv2d(h, w3, b3, padding=1).to(x_a.dtype)


def _coupling_forward(
    coupling: Coupling, x: torch.Tensor, network: Params, scratch: bool
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``Coupling.forward`` from the folded network; log-det None for additive (zero).
    ``scratch``: x is the caller's scratch tensor and no gradient is recorded, so y_b overwrites x_b."""
    # split/chunk rather than slicing: their backward is a cat, which keeps the gradient's memory
    # format (a slice's backward scatters into a contiguous zero tensor, and mixed formats make the
    # convolution and ReLU backward passes several times slower)
    x_a, x_b = x.split([coupling.split, x.shape[1] - coupling.split], dim=1)
    h = _coupling_network(x_a, network)
    if not coupling.affine:
        if scratch:
            x_b.add_(h)
            return x, None
        return torch.cat([x_a, x_b + h], dim=1), None
    shift, raw = h.chunk(2, dim=1)
    if coupling.scale_min:  # scale_min + (1 - scale_min) * sigmoid(raw) (the +2 is in the bias)
        scale = torch.sigmoid(raw).mul(1.0 - coupling.scale_min).add(coupling.scale_min)
        logdet = torch.log(scale).sum(dim=(1, 2, 3))
        if scratch:
            x_b.add_(shift).mul_(scale)
            return x, logdet
        return torch.cat([x_a, (x_b + shift) * scale], dim=1), logdet
    # log sigmoid(raw) = -softplus(-raw), stable (logsigmoid's backward would return a
    # contiguous-format gradient, see above)
    logdet = -F.softplus(-raw).sum(dim=(1, 2, 3))
    if scratch:
        x_b.add_(shift).mul_(raw.sigmoid_())
        return x, logdet
    return torch.cat([x_a, (x_b + shift) * torch.sigmoid(raw)], dim=1), logdet


def _coupling_reverse(coupling: Coupling, y: torch.Tensor, network: Params, scratch: bool) -> torch.Tensor:
    """``Coupling.reverse`` from the folded network (``scratch`` as in :func:`_coupling_forward`)."""
    y_a, y_b = y.split([coupling.split, y.shape[1] - coupling.split], dim=1)
    h = _coupling_network(y_a, network)
    if not coupling.affine:
        if scratch:
            y_b.sub_(h)
            return y
        return torch.cat([y_a, y_b - h], dim=1)
    shift, raw = h.chunk(2, dim=1)
    if coupling.scale_min:
        scale = torch.sigmoid(raw).mul(1.0 - coupling.scale_min).add(coupling.scale_min)
        if scratch:
            y_b.div_(scale).sub_(shift)
            return y
        return torch.cat([y_a, y_b / scale - shift], dim=1)
    if scratch:
        y_b.div_(raw.sigmoid_()).sub_(shift)
        return y
    return torch.cat([y_a, y_b / torch.sigmoid(raw) - shift], dim=1)


# ----------------------------------------------------------------------------- a fused split prior


class FusedSplitPrior:
    """A :class:`glowflow.layers.SplitPrior` with its prior convolution folded: same ``split``,
    ``forward`` (x_a, z, log p(z | x_a) (N,)) and ``reverse`` (same random numbers), the result of
    ``reverse`` in the memory format of ``flow``."""

    def __init__(self, split: SplitPrior, flow: FusedFlow):
        self.layer, self.flow, self.cache = split, flow, flow.cache

    def _mean_log_std(self, x_a: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        weight, bias = self.cache.get(self.layer, "prior", lambda: folded_zero_conv(self.layer.prior, True))
        mean, log_std = full_precision_conv(x_a, weight, bias, padding=1).chunk(2, dim=1)
        return mean, log_std

    def split(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.layer.split(x)

    def standardise(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(x_a, (z - mean(x_a)) / std(x_a)), as ``SplitPrior.standardise``."""
        x_a, z = x.split([self.layer.keep, x.shape[1] - self.layer.keep], dim=1)
        mean, log_std = self._mean_log_std(x_a)
        return x_a, (z - mean) * torch.exp(-log_std)

    def __call__(self, x: torch.Tensor):
        return self.forward(x)

    def forward(self, x: torch.Tensor):
        x_a, z = x.split([self.layer.keep, x.shape[1] - self.layer.keep], dim=1)
        mean, log_std = self._mean_log_std(x_a)
        return (
            x_a,
            z,
            prior_log_density(gaussian_log_density_sum(z, mean, log_std), self.layer.gaussian, z, mean, log_std),
        )

    def reverse(self, x_a: torch.Tensor, z: Optional[torch.Tensor] = None, temperature: float = 1.0) -> torch.Tensor:
        if z is None:
            mean, log_std = self._mean_log_std(x_a)
            noise = torch.randn(mean.shape, dtype=mean.dtype, device=mean.device)  # as randn_like of a strided view
            z = prior_draw(self.layer.gaussian, mean, log_std, noise, temperature)
        return torch.cat([x_a, z], dim=1).contiguous(memory_format=self.flow.memory_format)


# ----------------------------------------------------------------------------- a whole flow


class FusedFlow:
    """The fused counterparts of a Glow's levels (lists of :class:`FusedFlowStep`) and splits
    (:class:`FusedSplitPrior`), sharing one :class:`FusionCache`, with the squeeze of the fast path.

    ``channels_last`` (default True) keeps the activations channels_last.
    """

    def __init__(self, levels, splits):
        self.cache = FusionCache()
        self.channels_last = True
        self.levels = [[FusedFlowStep(step, self.cache) for step in level] for level in levels]
        self.splits = [FusedSplitPrior(split, self) for split in splits]

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def squeeze(self, x: torch.Tensor) -> torch.Tensor:
        """Space to depth (N, C, H, W) -> (N, 4C, H/2, W/2), in the flow's memory format."""
        return channels_last_squeeze2x(x) if self.channels_last else squeeze2x(x)

    def unsqueeze(self, x: torch.Tensor) -> torch.Tensor:
        """Depth to space (N, 4C, H, W) -> (N, C, 2H, 2W), in the flow's memory format."""
        return channels_last_unsqueeze2x(x) if self.channels_last else unsqueeze2x(x)

    def scratch_copy(self, x: torch.Tensor) -> torch.Tensor:
        """A private copy of ``x`` in the flow's memory format: the reverse pass may overwrite it
        in place, and never the caller's tensor."""
        return torch.empty_like(x, memory_format=self.memory_format).copy_(x)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """The image a reverse pass ends with, in the default memory format."""
        return x.contiguous()
