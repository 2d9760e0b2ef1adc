"""Glow: a multi-scale flow of ActNorm, invertible 1x1 convolutions and couplings.

The math contract (shared/DESIGN.md):

* pixels are uint8 in [0, 255]; with ``n_bits`` < 8 they become ``floor(p / 2**(8 - n_bits))``;
  model space is ``p / n_bins - 0.5`` in [-0.5, 0.5), ``n_bins = 2**n_bits``;
* training adds uniform noise U(0, 1/n_bins) per dimension (:func:`dequantize`);
* ``log_prob(x)`` is the continuous log-density in model space, nats per image: prior
  log-density of every latent (split priors included) plus log|det dz/dx|;
* bits/dim = ``-(log_prob(x) - D log n_bins) / (D ln 2)`` with D = C*H*W (:func:`bits_per_dim`).

Architecture for ``L`` levels: each level squeezes (C, H, W) -> (4C, H/2, W/2), applies ``K``
flow steps, and (all but the last) splits off half the channels as a latent with a learned
Gaussian prior conditioned on the other half. The last level's output is the top latent, with a
standard normal prior, a learned one (``learn_top``), and/or a class-conditional one
(``y_condition``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from glowflow.config import GlowConfig
from glowflow.pixels import bits_per_dim, dequantize, postprocess, preprocess  # noqa: F401 (re-exported)
from glowflow.layers import (
    ActNorm,
    FlowStep,
    SplitPrior,
    ZeroConv2d,
    ZeroLinear,
    autocast_off,
    channels_last_squeeze2x,
    channels_last_unsqueeze2x,
    gaussian_log_density,
    gaussian_log_density_sum,
    is_compiling,
    squeeze2x,
    sum_except_batch,
    unsqueeze2x,
)

_DEFAULTS = GlowConfig()


def classification_loss(y_logits: torch.Tensor, y: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Mean classification loss of the head on the top latent.

    Single-label (``y`` integer classes (N,) or one-hot (N, K)): softmax cross-entropy.
    Multi-label (``y`` multi-hot (N, K)): binary cross-entropy on the logits.
    """
    if multilabel:
        return F.binary_cross_entropy_with_logits(y_logits, y.to(y_logits.dtype))
    if y.dim() == 2:
        y = y.argmax(dim=1)
    return F.cross_entropy(y_logits, y.long())


# ----------------------------------------------------------------------------- the model


@dataclass
class FlowTerms:
    """Everything one pass x -> latents computes, per sample (all (N,) unless stated).

    latents: the split-off latents of levels 1..L-1, then the top latent (tensors).
    level_logdets: log|det| of each level's flow steps (squeeze and split contribute 0).
    level_log_priors: log-density of each level's latent under its prior (last = top prior).
    y_logits: (N, num_classes) classifier logits when ``y_condition``, else None.
    """

    latents: List[torch.Tensor]
    level_logdets: List[torch.Tensor]
    level_log_priors: List[torch.Tensor]
    y_logits: Optional[torch.Tensor]

    @property
    def logdet(self) -> torch.Tensor:
        return torch.stack(self.level_logdets).sum(0)

    @property
    def log_prob(self) -> torch.Tensor:
        return torch.stack(self.level_log_priors).sum(0) + self.logdet


class Glow(nn.Module):
    """Glow (Kingma & Dhariwal, 2018). Keyword arguments as the command-line flags.

    Input: model-space images (N, C, H, W) (see :func:`preprocess`); H, W divisible by 2**L.
    Latents: for level i < L, (N, C * 2**(i+1), H / 2**i, W / 2**i) (1-based i); top latent
    (N, C * 2**(L+1), H / 2**L, W / 2**L). Their sizes add up to C*H*W.

    Speed: ``fast`` (default True) runs every method through the fused fast path, the same
    mathematics with fewer operations (see glowflow/layers.py, "fast path helpers");
    ``model.fast = False`` (or ``glowflow.speed.eager(model)``) runs the plain layer-by-layer
    computation. ``channels_last`` (default True) keeps the fast path's activations channels_last.
    """

    fast: bool = True
    channels_last: bool = True

    def __init__(
        self,
        image_shape: Sequence[int] = _DEFAULTS.image_shape,
        hidden_channels: int = _DEFAULTS.hidden_channels,
        K: int = _DEFAULTS.K,
        L: int = _DEFAULTS.L,
        actnorm_scale: float = _DEFAULTS.actnorm_scale,
        flow_permutation: str = _DEFAULTS.flow_permutation,
        flow_coupling: str = _DEFAULTS.flow_coupling,
        LU_decomposed: bool = _DEFAULTS.LU_decomposed,
        learn_top: bool = _DEFAULTS.learn_top,
        y_condition: bool = _DEFAULTS.y_condition,
        num_classes: int = _DEFAULTS.num_classes,
        y_multilabel: bool = _DEFAULTS.y_multilabel,
        n_bits: int = _DEFAULTS.n_bits,
    ):
        super().__init__()
        self.config = GlowConfig(
            image_shape=tuple(image_shape), hidden_channels=hidden_channels, K=K, L=L,
            actnorm_scale=actnorm_scale, flow_permutation=flow_permutation, flow_coupling=flow_coupling,
            LU_decomposed=LU_decomposed, learn_top=learn_top, y_condition=y_condition,
            num_classes=num_classes, y_multilabel=y_multilabel, n_bits=n_bits,
        )
        c, h, w = self.config.image_shape
        self.levels = nn.ModuleList()
        self.splits = nn.ModuleList()
        self.latent_shapes: List[Tuple[int, int, int]] = []
        for level in range(L):
            c, h, w = c * 4, h // 2, w // 2
            self.levels.append(nn.ModuleList(
                FlowStep(c, hidden_channels, actnorm_scale, flow_permutation, flow_coupling, LU_decomposed)
                for _ in range(K)
            ))
            if level < L - 1:
                split = SplitPrior(c)
                self.splits.append(split)
                self.latent_shapes.append((c - split.keep, h, w))
                c = split.keep
        self.latent_shapes.append((c, h, w))
        self.top_shape = (c, h, w)
        self.top_learned = ZeroConv2d(2 * c, 2 * c) if learn_top else None
        if y_condition:
            self.y_prior = ZeroLinear(num_classes, 2 * c)
            self.classifier = ZeroLinear(c, num_classes)
        else:
            self.y_prior = self.classifier = None

    @classmethod
    def from_config(cls, config: GlowConfig) -> "Glow":
        return cls(**{k: v for k, v in config.__dict__.items()})

    @property
    def num_dims(self) -> int:
        c, h, w = self.config.image_shape
        return c * h * w

    # ------------------------------------------------------------------ priors

    def _condition(self, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Class labels (N,) integer, or one-/multi-hot (N, num_classes) -> float (N, num_classes)."""
        if y.dim() == 1 and not y.is_floating_point():
            return F.one_hot(y.long(), self.config.num_classes).to(dtype)
        return y.to(dtype)

    def top_prior(self, n: int, y: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-std of the top prior, each (n, *top_shape). ``y`` as in :meth:`log_prob`."""
        param = next(self.parameters())
        c, h, w = self.top_shape
        with autocast_off(param):  # priors stay in the parameters' precision under bf16 autocast
            params = torch.zeros(n, 2 * c, h, w, dtype=param.dtype, device=param.device)
            if self.top_learned is not None:
                params = self.top_learned(params)
            if self.y_prior is not None and y is not None:
                params = params + self.y_prior(self._condition(y, param.dtype))[:, :, None, None]
        return params[:, :c], params[:, c:]

    def _top_log_prior(self, z: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        n = z.shape[0]
        if self.fast:
            density = gaussian_log_density_sum
        else:
            def density(z, mean, log_std):
                return sum_except_batch(gaussian_log_density(z, mean, log_std))
        if self.y_prior is None or y is not None:
            mean, log_std = self.top_prior(n, y)
            return density(z, mean, log_std)
        if self.config.y_multilabel:
            # No labels given for a multi-label model: the prior with no label present.
            mean, log_std = self.top_prior(n, torch.zeros(n, self.config.num_classes, device=z.device))
            return density(z, mean, log_std)
        # No label given: the marginal over classes with a uniform class prior, a normalised density.
        k = self.config.num_classes
        per_class = []
        for cls in range(k):
            mean, log_std = self.top_prior(n, torch.full((n,), cls, dtype=torch.long, device=z.device))
            per_class.append(density(z, mean, log_std))
        return torch.logsumexp(torch.stack(per_class), dim=0) - math.log(k)

    # ------------------------------------------------------------------ x -> latents

    def forward_terms(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> FlowTerms:
        """One pass from model-space ``x`` (N, C, H, W) to every latent and log-density term.

        With ``y_condition`` and ``y`` None, the top prior is the uniform mixture over classes
        (single-label) or the no-label prior (multi-label). On the fast path the latents may be
        channels_last views (same values; use ``reshape``, not ``view``).
        """
        if self.fast:
            return self._fast_forward_terms(x, y)
        latents, logdets, log_priors = [], [], []
        for index, steps in enumerate(self.levels):
            x = squeeze2x(x)
            logdet = x.new_zeros(x.shape[0])
            for step in steps:
                x, ld = step(x)
                logdet = logdet + ld
            logdets.append(logdet)
            if index < len(self.splits):
                x, z, log_prior = self.splits[index](x)
                latents.append(z)
                log_priors.append(log_prior)
        latents.append(x)
        log_priors.append(self._top_log_prior(x, y))
        y_logits = self.classifier(x.mean(dim=(2, 3))) if self.classifier is not None else None
        return FlowTerms(latents, logdets, log_priors, y_logits)

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(log_prob (N,), y_logits (N, num_classes) or None): what training needs, as a module call
        (so DistributedDataParallel and torch.compile see it)."""
        terms = self.forward_terms(x, y)
        return terms.log_prob, terms.y_logits

    def encode(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """x (N, C, H, W) -> (latents, log|det d latents / dx| of shape (N,)); no prior terms."""
        if self.fast:
            terms = self._fast_forward_terms(x, None, priors=False)
            return [z.contiguous() for z in terms.latents], terms.logdet
        latents, logdets = [], []
        for index, steps in enumerate(self.levels):
            x = squeeze2x(x)
            for step in steps:
                x, ld = step(x)
                logdets.append(ld)
            if index < len(self.splits):
                keep = self.splits[index].keep
                latents.append(x[:, keep:])
                x = x[:, :keep]
        latents.append(x)
        return latents, torch.stack(logdets).sum(0)

    def log_prob(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Continuous log-density of model-space ``x`` (N, C, H, W), nats per image, shape (N,)."""
        return self.forward_terms(x, y).log_prob

    def bits_per_dim(self, x: torch.Tensor, n_bits: Optional[int] = None,
                     y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Bits/dim of (dequantised) model-space ``x`` at the model's own ``n_bits``, shape (N,).
        ``n_bits``, if given, must be the model's (it is only checked)."""
        if n_bits is not None and n_bits != self.config.n_bits:
            raise ValueError(f"this model sees {self.config.n_bits}-bit pixels, not {n_bits}")
        return bits_per_dim(self.log_prob(x, y), self.num_dims, self.config.n_bits)

    # ------------------------------------------------------------------ latents -> x

    def decode(self, latents: Sequence[Optional[torch.Tensor]], y: Optional[torch.Tensor] = None,
               temperature: float = 1.0) -> torch.Tensor:
        """The exact inverse of :meth:`encode`. A latent given as None is drawn from its prior
        (conditioned on everything above it) with std scaled by ``temperature``; the top latent
        is drawn too when None, its batch size taken from another latent or from ``y``."""
        latents = list(latents)
        if len(latents) != len(self.levels):
            raise ValueError(f"expected {len(self.levels)} latents, got {len(latents)}")
        x = latents[-1]
        if x is None:
            n = next((z.shape[0] for z in latents if z is not None), None)
            if n is None and y is None:
                raise ValueError("decode needs the top latent, another latent or y to know the batch size")
            x = self._sample_top(n if n is not None else y.shape[0], y, temperature)
        if self.fast:
            return self._fast_decode(x, latents, temperature)
        for index in reversed(range(len(self.levels))):
            if index < len(self.splits):
                x = self.splits[index].reverse(x, latents[index], temperature)
            for step in reversed(self.levels[index]):
                x = step.reverse(x)
            x = unsqueeze2x(x)
        return x

    def _sample_top(self, n: int, y: Optional[torch.Tensor], temperature: float) -> torch.Tensor:
        if self.y_prior is not None and y is None:
            param = next(self.parameters())
            if self.config.y_multilabel:
                y = torch.zeros(n, self.config.num_classes, device=param.device)
            else:
                y = torch.randint(self.config.num_classes, (n,), device=param.device)
        mean, log_std = self.top_prior(n, y)
        return mean + temperature * torch.exp(log_std) * torch.randn_like(mean)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``n`` model-space samples (n, C, H, W). ``y``: classes (n,) or (n, K) for a conditional
        model; without it classes are drawn uniformly (single-label) or left empty (multi-label).
        Temperature 0 decodes the prior means."""
        if y is not None and y.shape[0] != n:
            raise ValueError(f"y has {y.shape[0]} rows for {n} samples")
        top = self._sample_top(n, y, temperature)
        return self.decode([None] * (len(self.levels) - 1) + [top], y=y, temperature=temperature)

    # ------------------------------------------------------------------ the fast path

    def _squeeze(self, x: torch.Tensor) -> torch.Tensor:
        return channels_last_squeeze2x(x) if self.channels_last else squeeze2x(x)

    def _unsqueeze(self, x: torch.Tensor) -> torch.Tensor:
        return channels_last_unsqueeze2x(x) if self.channels_last else unsqueeze2x(x)

    def _fast_forward_terms(self, x: torch.Tensor, y: Optional[torch.Tensor], priors: bool = True) -> FlowTerms:
        """:meth:`forward_terms` through the fused layers (``priors=False``: latents and log-dets
        only, as :meth:`encode`). A flow step whose ActNorms are not initialised yet runs its plain
        ``forward`` (which initialises them in training mode)."""
        latents, logdets, log_priors = [], [], []
        for index, steps in enumerate(self.levels):
            x = self._squeeze(x)
            pixel_logdets, sample_logdets = [], []
            for step in steps:
                if step.is_initialized():
                    x, pixel_logdet, coupling_logdet = step.fast_forward(x)
                    pixel_logdets.append(pixel_logdet)
                    if coupling_logdet is not None:
                        sample_logdets.append(coupling_logdet)
                else:
                    x, logdet = step(x)
                    sample_logdets.append(logdet)
            logdet = x.shape[2] * x.shape[3] * torch.stack(pixel_logdets).sum() if pixel_logdets else 0.0
            if sample_logdets:
                logdet = logdet + torch.stack(sample_logdets).sum(0)
            else:
                logdet = x.new_zeros(x.shape[0]) + logdet
            logdets.append(logdet)
            if index < len(self.splits):
                split = self.splits[index]
                if priors:
                    x, z, log_prior = split.fast_forward(x)
                    log_priors.append(log_prior)
                else:
                    x, z = x[:, : split.keep], x[:, split.keep :]
                latents.append(z)
        latents.append(x)
        if not priors:
            return FlowTerms(latents, logdets, log_priors, None)
        log_priors.append(self._top_log_prior(x, y))
        y_logits = self.classifier(x.mean(dim=(2, 3))) if self.classifier is not None else None
        return FlowTerms(latents, logdets, log_priors, y_logits)

    def _fast_decode(self, x: torch.Tensor, latents: List[Optional[torch.Tensor]], temperature: float) -> torch.Tensor:
        """The rest of :meth:`decode` from the top latent ``x``, through the fused layers."""
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        inplace = not torch.is_grad_enabled() and not is_compiling()
        # a private copy, so the in-place coupling inverse never writes into the caller's latent
        x = torch.empty_like(x, memory_format=memory_format).copy_(x)
        for index in reversed(range(len(self.levels))):
            if index < len(self.splits):
                x = self.splits[index].fast_reverse(x, latents[index], temperature)
                x = x.contiguous(memory_format=memory_format)
            for step in reversed(self.levels[index]):
                x = step.fast_reverse(x, inplace)
            x = self._unsqueeze(x)
        return x.contiguous()

    def clear_fast_cache(self) -> None:
        """Drop the fast path's cached parameter-only tensors. Only needed after changing
        parameters in place without bumping their version counters (through ``.data``, or a fused
        optimizer) while the model stays in eval mode with no forward pass in between."""
        for module in self.modules():
            module.__dict__.pop("_fusion_cache", None)

    # ------------------------------------------------------------------ initialisation

    @torch.no_grad()
    def initialize(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> None:
        """Data-dependent ActNorm initialisation from the model-space batch ``x`` (once)."""
        was_training = self.training
        self.train()
        self.forward_terms(x, y)
        self.train(was_training)

    def is_initialized(self) -> bool:
        """True once every ActNorm has been initialised from data."""
        return all(bool(m.initialized) for m in self.modules() if isinstance(m, ActNorm))
