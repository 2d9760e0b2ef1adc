"""Glow: a multi-scale flow of ActNorm, invertible 1x1 convolutions and couplings, in one
class that knows its own configuration and data space (image shape and bit depth): the flow and its
densities.

Architecture for ``L`` levels: each level squeezes (C, H, W) -> (4C, H/2, W/2), applies ``K``
flow steps, and (all but the last) splits off half the channels as a latent with a learned
Gaussian prior conditioned on the other half (glowflow/flow.py's ``Level``). The last level's
output is the top latent, with a standard normal prior, a learned one (``learn_top``), and/or a
class-conditional one (``y_condition``) (glowflow/priors.py). The mathematics is stated in
docs/math.md; the pixel maps are glowflow/pixels.py.

One loop runs each direction (glowflow/flow.py's ``FlowLevels``: :meth:`Glow.forward_terms` /
:meth:`Glow.encode` forwards; :meth:`Glow.decode` and checked sampling, glowflow/sampling.py, in
reverse), over the plain layers of glowflow/layers.py or their fused counterparts of
glowflow/fused.py (``model.fast``, on by default). Stored models are read by glowflow/reader.py
and written by glowflow/pretrained.py; :meth:`Glow.from_pretrained` and :meth:`Glow.save_pretrained`
only hand the model to them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from glowflow.config import GlowConfig
from glowflow.flow import FlowLevels, PlainFlow
from glowflow.fused import FusedFlow
from glowflow.latent_fit import LatentGaussian, LatentMoments, fitted_gaussian
from glowflow.layers import ActNorm, FlowStep, SplitPrior, ZeroConv2d, ZeroLinear
from glowflow.pixels import bits_per_dim, dequantize, postprocess, preprocess
from glowflow.pretrained import find_folder, save_pretrained
from glowflow.priors import TopPrior, classification_loss
from glowflow.reader import StoredCheckpoint
from glowflow.sampling import SAMPLE_BOUND, SAMPLE_MAX_ROUNDS, SampleReport, checked_sample

__all__ = ["Glow", "FlowTerms", "SampleReport", "classification_loss", "SAMPLE_BOUND", "SAMPLE_MAX_ROUNDS"]


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
    """Glow (Kingma & Dhariwal, 2018), built from a :class:`GlowConfig` (the one home of the
    architecture's fields and defaults): ``Glow(GlowConfig(image_shape=(1, 32, 32), K=8, L=3))``.

    Input: model-space images (N, C, H, W) (see :meth:`preprocess`); H, W divisible by 2**L.
    Latents: for level i < L, (N, C * 2**(i+1), H / 2**i, W / 2**i) (1-based i); top latent
    (N, C * 2**(L+1), H / 2**L, W / 2**L). Their sizes add up to C*H*W.

    Speed: ``fast`` (default True) runs every method through the fused layers of
    glowflow/fused.py, the same mathematics with fewer operations; ``model.fast = False`` (or
    ``glowflow.runtime.eager(model)``) runs the plain layers. ``channels_last`` (default True)
    keeps the fast path's activations channels_last. Memory: ``grad_checkpoint`` (default False)
    keeps only each flow step's input during training and recomputes the rest in the backward pass.
    """

    def __init__(self, config: Optional[GlowConfig] = None, **old_fields):
        super().__init__()
        if not isinstance(config, GlowConfig) or old_fields:  # the old Glow((C, H, W), ...) or Glow(K=8, ...)
            raise TypeError("Glow takes one GlowConfig: Glow(GlowConfig(image_shape=..., K=..., L=...))")
        self.config = cfg = config
        c, h, w = cfg.image_shape
        self.levels = nn.ModuleList()
        self.splits = nn.ModuleList()
        self.latent_shapes: List[Tuple[int, int, int]] = []
        for level in range(cfg.L):
            c, h, w = c * 4, h // 2, w // 2
            self.levels.append(
                nn.ModuleList(
                    FlowStep(
                        c,
                        cfg.hidden_channels,
                        cfg.actnorm_scale,
                        cfg.flow_permutation,
                        cfg.flow_coupling,
                        cfg.LU_decomposed,
                        cfg.coupling_scale_min,
                    )
                    for _ in range(cfg.K)
                )
            )
            if level < cfg.L - 1:
                split = SplitPrior(c, cfg.prior_fit, (h, w))
                self.splits.append(split)
                self.latent_shapes.append((c - split.keep, h, w))
                c = split.keep
        self.latent_shapes.append((c, h, w))
        self.top_shape = (c, h, w)
        self.top_learned = ZeroConv2d(2 * c, 2 * c) if cfg.learn_top else None
        if cfg.y_condition:
            self.y_prior = ZeroLinear(cfg.num_classes, 2 * c)
            self.classifier = ZeroLinear(c, cfg.num_classes)
        else:
            self.y_prior = self.classifier = None
        self.top_gaussian = fitted_gaussian(self.top_shape, cfg.prior_fit)
        # a view: no new weights
        self.prior = TopPrior(cfg, self.top_shape, self.top_learned, self.y_prior, self.top_gaussian)
        self.fast = True
        self.grad_checkpoint = False  # recompute each flow step's activations in the backward pass
        self.plain = PlainFlow(self.levels, self.splits)  # the reference computation
        self.fused = FusedFlow(self.levels, self.splits)  # the fast path, with its FusionCache
        self._plain_levels, self._fused_levels = FlowLevels(self.plain), FlowLevels(self.fused)
        self.last_sample_report: Optional[SampleReport] = None  # set by sample()

    @classmethod
    def from_config(cls, config: GlowConfig) -> Glow:
        return cls(config)

    # ------------------------------------------------------------------ sharing (glowflow/pretrained.py, reader.py)

    def save_pretrained(
        self,
        folder: str,
        dataset: Optional[str] = None,
        image_size: Optional[int] = None,
        command: Optional[str] = None,
        scores: Optional[Dict[str, float]] = None,
        notes: Optional[str] = None,
    ) -> str:
        """Write the model folder ``folder`` (config.json, model.safetensors, a README.md model card
        stating ``dataset``, ``command``, ``scores`` and ``notes``): glowflow.pretrained.save_pretrained.
        Returns ``folder``."""
        return save_pretrained(self, folder, dataset, image_size, command, scores, notes)

    @classmethod
    def from_pretrained(cls, folder: str, device: Any = "cpu") -> Glow:
        """The model of a folder written by :meth:`save_pretrained` (or ``glowflow --export``), or of
        a model shipped in the package (``"pretrained:NAME"``, or the bare ``"NAME"`` when no local
        folder of that name exists: ``Glow.from_pretrained("fashionmnist")``), in eval mode on
        ``device``, in the floating-point type its weights were saved in. Every file is checked
        first by glowflow/reader.py (one-line GlowflowError); nothing is unpickled."""
        return StoredCheckpoint.read_folder(find_folder(folder), model_class=cls).load_model(device)

    @property
    def num_dims(self) -> int:
        """D = C*H*W, the dimensions of one image."""
        c, h, w = self.config.image_shape
        return c * h * w

    @property
    def channels_last(self) -> bool:
        return self.fused.channels_last

    @channels_last.setter
    def channels_last(self, value: bool) -> None:
        self.fused.channels_last = bool(value)

    def _flow(self) -> FlowLevels:
        """The levels the loops run: over the fused layers (``fast``) or the plain ones."""
        return self._fused_levels if self.fast else self._plain_levels

    # ------------------------------------------------------------------ the data space

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (N, C, H, W) -> model space at the model's ``n_bits`` (no noise)."""
        return preprocess(images, self.config.n_bits)

    def dequantize(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Model-space ``x`` plus dequantisation noise U(0, 1/n_bins)."""
        return dequantize(x, self.config.n_bits, generator)

    def postprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Model space -> images in [0, 1] on the model's ``n_bits`` grid."""
        return postprocess(x, self.config.n_bits)

    # ------------------------------------------------------------------ priors (glowflow/priors.py)

    def top_prior(self, n: int, y: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-std of the top prior, each (n, *top_shape). ``y`` as in :meth:`log_prob`."""
        return self.prior.mean_log_std(n, y, next(self.parameters()))

    def _sample_top(self, n: int, y: Optional[torch.Tensor], temperature: float) -> torch.Tensor:
        """``n`` top latents from the prior at ``temperature`` (classes drawn when ``y`` is None)."""
        return self.prior.draw(n, y, temperature, next(self.parameters()))

    # ------------------------------------------------------------------ x -> latents

    def _run_step(self, step, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """One flow step forward. With ``grad_checkpoint`` (and gradients on), its activations are
        not kept but recomputed in the backward pass (``torch.utils.checkpoint``, non-reentrant):
        the same gradients for a step's input alone in memory. A step whose ActNorms are not
        initialised yet runs as usual, so the data-dependent initialisation happens once."""
        if self.grad_checkpoint and torch.is_grad_enabled() and step.is_initialized():
            return checkpoint(step, x, use_reentrant=False)
        return step(x)

    def forward_terms(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> FlowTerms:
        """One pass from model-space ``x`` (N, C, H, W) to every latent and log-density term.

        With ``y_condition`` and ``y`` None, the top prior is the uniform mixture over classes
        (single-label) or the no-label prior (multi-label). On the fast path the latents may be
        channels_last views (same values; use ``reshape``, not ``view``).
        """
        latents, logdets, log_priors = self._flow().forward(x, self._run_step)
        top = latents[-1]
        log_priors.append(self.prior.log_density(top, y, next(self.parameters()), fused=self.fast))
        y_logits = self.classifier(top.mean(dim=(2, 3))) if self.classifier is not None else None
        return FlowTerms(latents, logdets, log_priors, y_logits)

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(log_prob (N,), y_logits (N, num_classes) or None): what training needs, as a module call
        (so DistributedDataParallel and torch.compile see it)."""
        terms = self.forward_terms(x, y)
        return terms.log_prob, terms.y_logits

    def encode(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """x (N, C, H, W) -> (latents, log|det d latents / dx| of shape (N,)); no prior terms."""
        latents, logdets, _ = self._flow().forward(x, self._run_step, priors=False)
        return [z.contiguous() for z in latents], torch.stack(logdets).sum(0)

    def log_prob(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Continuous log-density of model-space ``x`` (N, C, H, W), nats per image, shape (N,)."""
        return self.forward_terms(x, y).log_prob

    def bits_per_dim(
        self, x: torch.Tensor, y: Optional[torch.Tensor] = None, *, n_bits: Optional[int] = None
    ) -> torch.Tensor:
        """Bits/dim of (dequantised) model-space ``x`` (N, C, H, W) at the model's own ``n_bits``,
        shape (N,); ``y`` as in :meth:`log_prob`. ``n_bits=`` is deprecated (the model knows its
        own; it is only checked) and goes in the next release."""
        if n_bits is not None:
            warnings.warn(
                "Glow.bits_per_dim(x, n_bits=...) is deprecated: the model uses its own n_bits; drop the argument",
                DeprecationWarning,
                stacklevel=2,
            )
            if n_bits != self.config.n_bits:
                raise ValueError(f"this model sees {self.config.n_bits}-bit pixels, not {n_bits}")
        if y is not None and not isinstance(y, torch.Tensor):  # the old bits_per_dim(x, n_bits)
            raise TypeError(f"bits_per_dim(x, y): y is a tensor of classes, not {y!r} (the model's n_bits is its own)")
        return bits_per_dim(self.log_prob(x, y), self.num_dims, self.config.n_bits)

    # ------------------------------------------------------------------ latents -> x

    def decode(
        self, latents: Sequence[Optional[torch.Tensor]], y: Optional[torch.Tensor] = None, temperature: float = 1.0
    ) -> torch.Tensor:
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
        return self._flow().reverse(x, latents, temperature)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        temperature: float = 1.0,
        y: Optional[torch.Tensor] = None,
        redraw: bool = True,
        max_rounds: int = SAMPLE_MAX_ROUNDS,
        bound: float = SAMPLE_BOUND,
    ) -> torch.Tensor:
        """``n`` model-space samples (n, C, H, W). ``y``: classes (n,) or (n, K) for a conditional
        model; without it classes are drawn uniformly (single-label) or left empty (multi-label).
        Temperature 0 decodes the prior means.

        Every level's output is checked: a sample with a non-finite value there, or one above
        ``bound`` in absolute value, is drawn again from the top (``redraw``; at most ``max_rounds``
        rounds; what still fails is returned and counted). The first draw is exactly a plain draw
        (the random numbers and values of :meth:`decode`), and no random number is used after it
        when every sample passes. The samples kept follow the model's distribution restricted to
        the passing region (the density itself is unchanged). What happened is in
        ``self.last_sample_report`` (a :class:`SampleReport`); :meth:`sample_with_report` returns it."""
        x, _ = self.sample_with_report(n, temperature, y, redraw=redraw, max_rounds=max_rounds, bound=bound)
        return x

    @torch.no_grad()
    def sample_with_report(
        self,
        n: int,
        temperature: float = 1.0,
        y: Optional[torch.Tensor] = None,
        redraw: bool = True,
        max_rounds: int = SAMPLE_MAX_ROUNDS,
        bound: float = SAMPLE_BOUND,
    ) -> Tuple[torch.Tensor, SampleReport]:
        """(samples (n, C, H, W), :class:`SampleReport`): :meth:`sample` with its report
        (glowflow/sampling.py's ``checked_sample``)."""
        x, report = checked_sample(self._flow(), self._sample_top, n, temperature, y, redraw, max_rounds, bound)
        self.last_sample_report = report
        return x, report

    # ------------------------------------------------------------------ state

    def train(self, mode: bool = True) -> Glow:
        self.fused.cache.clear()
        return super().train(mode)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self.fused.cache.clear()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _apply(self, fn, *args, **kwargs):
        self.fused.cache.clear()
        return super()._apply(fn, *args, **kwargs)

    def clear_fast_cache(self) -> None:
        """Drop the fast path's cached parameter-only tensors. Only needed after changing
        parameters in place without bumping their version counters (through ``.data``, or a fused
        optimizer) while the model stays in eval mode with no forward pass in between."""
        self.fused.cache.clear()

    @torch.no_grad()
    def initialize(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> None:
        """Data-dependent ActNorm initialisation from the model-space batch ``x`` (once)."""
        was_training = self.training
        self.train()
        self.forward_terms(x, y)
        self.train(was_training)

    # ------------------------------------------------------------------ the priors' fitted Gaussians

    def fitted_gaussians(self) -> List[LatentGaussian]:
        """The priors' fitted Gaussians, one per latent (split-off ones, then the top); empty with
        ``prior_fit`` 'none'."""
        found = [split.gaussian for split in self.splits] + [self.top_gaussian]
        return [g for g in found if g is not None]

    @torch.no_grad()
    def standardised_latents(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        """Every latent of model-space ``x`` (N, C, H, W) standardised by its prior, (z - mean) / std
        (the split-off latents, then the top one, shapes as :meth:`encode`'s): what each fitted
        Gaussian models. ``y``: the true classes of a class-conditional model."""
        latents, _, _ = self._flow().forward(x, self._run_step, priors=False, standardised=True)
        latents[-1] = self.prior.standardise(latents[-1], y, next(self.parameters()))
        return latents

    @torch.no_grad()
    def fit_priors(self, batches: Iterable) -> int:
        """Fit every prior's Gaussian (``prior_fit`` 'full' or 'diag') by maximum likelihood to the
        standardised latents of ``batches`` ((x, y) pairs: dequantised model-space images and their
        classes, or y None), replacing an earlier fit; the flow and the learned priors are
        unchanged. Returns the images fitted on; 0 when some latent was not finite (then every
        fit is left as it was)."""
        gaussians = self.fitted_gaussians()
        if not gaussians:
            raise ValueError("this model has no fitted priors (prior_fit 'none')")
        device = next(self.parameters()).device
        moments = [LatentMoments(g.shift.numel(), g.full, device) for g in gaussians]
        was_training = self.training
        self.eval()
        try:
            for x, y in batches:
                for sums, e in zip(moments, self.standardised_latents(x, y)):
                    sums.add(e)
        finally:
            self.train(was_training)
        if not all(sums.finite for sums in moments):
            return 0
        for gaussian, sums in zip(gaussians, moments):
            gaussian.fit(sums)
        self.fused.cache.clear()
        return int(moments[0].count)

    def is_initialized(self) -> bool:
        """True once every ActNorm has been initialised from data."""
        return all(bool(m.initialized) for m in self.modules() if isinstance(m, ActNorm))
