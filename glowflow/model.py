"""Glow: a multi-scale flow of ActNorm, invertible 1x1 convolutions and couplings, in one
class that knows its own data space (image shape and bit depth).

Architecture for ``L`` levels: each level squeezes (C, H, W) -> (4C, H/2, W/2), applies ``K``
flow steps, and (all but the last) splits off half the channels as a latent with a learned
Gaussian prior conditioned on the other half. The last level's output is the top latent, with a
standard normal prior, a learned one (``learn_top``), and/or a class-conditional one
(``y_condition``). The mathematics is stated in docs/math.md; the pixel maps are glowflow/pixels.py.

One loop runs each direction (:meth:`Glow.forward_terms` / :meth:`Glow.encode` forwards,
:meth:`Glow.decode` in reverse), over the plain layers of glowflow/layers.py or their fused
counterparts of glowflow/fused.py (``model.fast``, on by default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from glowflow.config import GlowConfig
from glowflow.fused import FusedFlow, autocast_off, gaussian_log_density_sum
from glowflow.layers import (
    ActNorm,
    FlowStep,
    SplitPrior,
    ZeroConv2d,
    ZeroLinear,
    gaussian_log_density,
    squeeze2x,
    sum_except_batch,
    unsqueeze2x,
)
from glowflow.pixels import bits_per_dim, dequantize, postprocess, preprocess
from glowflow.pretrained import PretrainedFolder, find_folder, model_card, saved_dtype, write_folder

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


class PlainFlow:
    """The plain layers of a Glow (the reference computation), with the interface of
    :class:`glowflow.fused.FusedFlow` that the model's loops use."""

    def __init__(self, levels: nn.ModuleList, splits: nn.ModuleList):
        self.levels, self.splits = levels, splits

    squeeze = staticmethod(squeeze2x)
    unsqueeze = staticmethod(unsqueeze2x)

    @staticmethod
    def scratch_copy(x: torch.Tensor) -> torch.Tensor:
        return x

    @staticmethod
    def finish(x: torch.Tensor) -> torch.Tensor:
        return x


def _plain_log_density_sum(x: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    return sum_except_batch(gaussian_log_density(x, mean, log_std))


SAMPLE_BOUND = 100.0
"""Default bound of :meth:`Glow.sample`'s check: on real images every level's values stay within
about 10 in absolute value (docs/sampling.md); a sample past 100 at a level has left the data's
region and its reverse couplings are amplifying it (it ends non-finite or saturated)."""
SAMPLE_MAX_ROUNDS = 10
"""Default number of rounds in which :meth:`Glow.sample` draws again the samples that failed its check."""


def _finite_rows(x: torch.Tensor) -> torch.Tensor:
    """(N,) bool: the rows of ``x`` whose values are all finite."""
    return torch.isfinite(x).flatten(1).all(dim=1)


def _outside(x: torch.Tensor, bound: float) -> torch.Tensor:
    """(N,) bool: the rows of ``x`` with a non-finite value or one above ``bound`` in absolute value."""
    # one reduction, no copy, whatever the memory format; a NaN makes the norm NaN, which compares False
    return ~(torch.linalg.vector_norm(x, ord=math.inf, dim=tuple(range(1, x.dim()))) <= bound)


@dataclass
class SampleReport:
    """What one :meth:`Glow.sample` call met, level by level (lists indexed like the levels: 0 is
    the finest, whose output is the image; the reverse pass runs from the last).

    failed[i]: samples of the first draw whose values first failed the check (a non-finite value,
    or one above ``bound`` in absolute value) at the output of level i; failed_nonfinite[i]: those
    of them with a non-finite value there. redrawn: samples drawn again (from the top, every level
    anew); redraws: whole samples drawn again in all (one sample may be drawn several times);
    rounds: rounds of redraws. left: samples still failing after ``max_rounds`` rounds (returned as
    they are); nonfinite: non-finite samples returned.
    """

    n: int
    temperature: float
    bound: float
    max_rounds: int
    failed: List[int] = field(default_factory=list)
    failed_nonfinite: List[int] = field(default_factory=list)
    redraws: int = 0
    rounds: int = 0
    redrawn: int = 0
    left: int = 0
    nonfinite: int = 0

    @property
    def first_draw_failures(self) -> int:
        """Samples that failed some level's check on that level's first draw (at most ``n``)."""
        return sum(self.failed)

    @property
    def clean(self) -> bool:
        """True when no sample failed any check (nothing was redrawn or left)."""
        return not any(self.failed)

    def describe(self) -> str:
        """One line: what failed, what was redrawn and what is left (what every command prints
        for a grid of samples; the training's sample grids can print it too)."""
        head = f"{self.n} samples at temperature {self.temperature:g}"
        if self.clean:
            return f"{head}: all finite and within {self.bound:g} at every level, none redrawn"
        levels = ", ".join(
            f"level {i + 1}: {f} ({nf} not finite)"
            for i, (f, nf) in enumerate(zip(self.failed, self.failed_nonfinite))
            if f
        )
        text = f"{head}: first draw failed the check (non-finite or |value| > {self.bound:g}) at {levels}"
        if self.max_rounds:
            text += f"; {self.redrawn} redrawn ({self.redraws} draws in {self.rounds} rounds)"
        else:
            text += "; not redrawn"
        text += f"; {self.left} still failing, {self.nonfinite} not finite in the result"
        if self.nonfinite:
            text += " (saved black)"
        return text


class Glow(nn.Module):
    """Glow (Kingma & Dhariwal, 2018), built from a :class:`GlowConfig` or its fields as keywords
    (the command-line flags): ``Glow(config)`` or ``Glow(image_shape=(1, 32, 32), K=8, ...)``.

    Input: model-space images (N, C, H, W) (see :meth:`preprocess`); H, W divisible by 2**L.
    Latents: for level i < L, (N, C * 2**(i+1), H / 2**i, W / 2**i) (1-based i); top latent
    (N, C * 2**(L+1), H / 2**L, W / 2**L). Their sizes add up to C*H*W.

    Speed: ``fast`` (default True) runs every method through the fused layers of
    glowflow/fused.py, the same mathematics with fewer operations; ``model.fast = False`` (or
    ``glowflow.runtime.eager(model)``) runs the plain layers. ``channels_last`` (default True)
    keeps the fast path's activations channels_last. Memory: ``grad_checkpoint`` (default False)
    keeps only each flow step's input during training and recomputes the rest in the backward pass.
    """

    def __init__(self, config: Optional[GlowConfig] = None, **fields):
        super().__init__()
        if config is not None and not isinstance(config, GlowConfig):  # Glow((C, H, W), ...)
            config, fields = None, {"image_shape": config, **fields}
        if config is not None and fields:
            raise TypeError("Glow takes a GlowConfig or its fields as keywords, not both")
        self.config = config if config is not None else GlowConfig(**fields)
        cfg = self.config
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
                split = SplitPrior(c)
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
        self.fast = True
        self.grad_checkpoint = False  # recompute each flow step's activations in the backward pass
        self.plain = PlainFlow(self.levels, self.splits)  # the reference computation
        self.fused = FusedFlow(self.levels, self.splits)  # the fast path, with its FusionCache
        self.last_sample_report: Optional[SampleReport] = None  # set by sample()

    @classmethod
    def from_config(cls, config: GlowConfig) -> Glow:
        return cls(config)

    # ------------------------------------------------------------------ sharing (glowflow/pretrained.py)

    def save_pretrained(
        self,
        folder: str,
        dataset: Optional[str] = None,
        image_size: Optional[int] = None,
        command: Optional[str] = None,
        scores: Optional[Dict[str, float]] = None,
        notes: Optional[str] = None,
    ) -> str:
        """Write the model folder ``folder``: ``config.json`` (the configuration, and ``dataset`` /
        ``image_size`` it was trained on, if given), ``model.safetensors`` (every tensor of the state
        dict, buffers included) and a ``README.md`` model card (``command``: the training command;
        ``scores``: e.g. ``{"test bits/dim": 3.27}``; ``notes``: Markdown appended). Returns ``folder``."""
        card = model_card(self.config, dataset, command, scores, notes=notes)
        return write_folder(folder, self.config, self.state_dict(), dataset, image_size, card)

    @classmethod
    def from_pretrained(cls, folder: str, device: Any = "cpu") -> Glow:
        """The model of a folder written by :meth:`save_pretrained` (or ``glowflow --export``), or of
        a model shipped in the package (``"pretrained:NAME"``, or the bare ``"NAME"`` when no local
        folder of that name exists: ``Glow.from_pretrained("fashionmnist")``), in eval mode on
        ``device``, in the floating-point type its weights were saved in. Every file is checked
        first (one-line GlowflowError); nothing is unpickled."""
        found = PretrainedFolder.open(find_folder(folder))
        model = cls(found.config)
        weights = found.read_weights(model.state_dict())
        if saved_dtype(weights) is not None:
            model.to(saved_dtype(weights))
        model.load_state_dict(weights)
        return model.to(device).eval()

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

    def _flow(self):
        """The layers the loops run: fused (``fast``) or plain."""
        return self.fused if self.fast else self.plain

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
        density = gaussian_log_density_sum if self.fast else _plain_log_density_sum
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

    def _forward_levels(self, x: torch.Tensor, priors: bool = True):
        """The one forward loop: (latents, per-level log-dets, per-level log-priors of the split
        latents (empty when ``priors`` is False)), all but the latents (N,)."""
        flow = self._flow()
        latents, logdets, log_priors = [], [], []
        for index, steps in enumerate(flow.levels):
            x = flow.squeeze(x)
            logdet = x.new_zeros(x.shape[0])
            for step in steps:
                x, step_logdet = self._run_step(step, x)
                logdet = logdet + step_logdet
            logdets.append(logdet)
            if index < len(flow.splits):
                if priors:
                    x, z, log_prior = flow.splits[index](x)
                    log_priors.append(log_prior)
                else:
                    x, z = flow.splits[index].split(x)
                latents.append(z)
        latents.append(x)
        return latents, logdets, log_priors

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
        latents, logdets, log_priors = self._forward_levels(x)
        top = latents[-1]
        log_priors.append(self._top_log_prior(top, y))
        y_logits = self.classifier(top.mean(dim=(2, 3))) if self.classifier is not None else None
        return FlowTerms(latents, logdets, log_priors, y_logits)

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(log_prob (N,), y_logits (N, num_classes) or None): what training needs, as a module call
        (so DistributedDataParallel and torch.compile see it)."""
        terms = self.forward_terms(x, y)
        return terms.log_prob, terms.y_logits

    def encode(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """x (N, C, H, W) -> (latents, log|det d latents / dx| of shape (N,)); no prior terms."""
        latents, logdets, _ = self._forward_levels(x, priors=False)
        return [z.contiguous() for z in latents], torch.stack(logdets).sum(0)

    def log_prob(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Continuous log-density of model-space ``x`` (N, C, H, W), nats per image, shape (N,)."""
        return self.forward_terms(x, y).log_prob

    def bits_per_dim(
        self, x: torch.Tensor, n_bits: Optional[int] = None, y: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Bits/dim of (dequantised) model-space ``x`` at the model's own ``n_bits``, shape (N,).
        ``n_bits``, if given, must be the model's (it is only checked)."""
        if n_bits is not None and n_bits != self.config.n_bits:
            raise ValueError(f"this model sees {self.config.n_bits}-bit pixels, not {n_bits}")
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
        flow = self._flow()
        x = flow.scratch_copy(x)
        for index in reversed(range(len(flow.levels))):
            if index < len(flow.splits):
                x = flow.splits[index].reverse(x, latents[index], temperature)
            for step in reversed(flow.levels[index]):
                x = step.reverse(x)
            x = flow.unsqueeze(x)
        return flow.finish(x)

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
        """(samples (n, C, H, W), :class:`SampleReport`): :meth:`sample` with its report."""
        if y is not None and y.shape[0] != n:
            raise ValueError(f"y has {y.shape[0]} rows for {n} samples")
        if not (bound > 0):
            raise ValueError(f"bound must be positive, got {bound}")
        if max_rounds < 0:
            raise ValueError(f"max_rounds must be 0 or more, got {max_rounds}")
        rounds = max_rounds if redraw else 0
        flow = self._flow()
        levels = len(flow.levels)
        report = SampleReport(n=n, temperature=float(temperature), bound=float(bound), max_rounds=rounds)
        x, bad, failed_at, nonfinite_at = self._checked_draw(flow, n, y, temperature, bound)
        report.failed = [int((failed_at == i).sum()) for i in range(levels)]
        report.failed_nonfinite = [int((failed_at == i).logical_and(nonfinite_at).sum()) for i in range(levels)]
        report.redrawn = int(bad.sum()) if rounds else 0
        for _ in range(rounds):
            if not bool(bad.any()):
                break
            rows = bad.nonzero().squeeze(1)
            report.rounds += 1
            report.redraws += len(rows)
            redo, redo_bad, _, _ = self._checked_draw(
                flow, len(rows), None if y is None else y[rows], temperature, bound
            )
            x[rows] = redo.to(x.dtype)
            bad[rows] = redo_bad
        report.left = int(bad.sum())
        report.nonfinite = int((~_finite_rows(x)).sum())
        self.last_sample_report = report
        return x, report

    def _checked_draw(self, flow, n: int, y: Optional[torch.Tensor], temperature: float, bound: float):
        """One draw of ``n`` samples, as :meth:`decode` of fresh latents (the same random numbers
        and values), checking every level's output. Returns (samples (n, C, H, W), failed (n,)
        bool, the level (n,) int64 where each sample first failed (-1: none), whether it was a
        non-finite value there (n,) bool)."""
        x = self._sample_top(n, y, temperature)
        failed_at = torch.full((n,), -1, dtype=torch.long, device=x.device)
        nonfinite_at = torch.zeros(n, dtype=torch.bool, device=x.device)
        x = flow.scratch_copy(x)
        for index in reversed(range(len(flow.levels))):
            if index < len(flow.splits):
                x = flow.splits[index].reverse(x, None, temperature)
            for step in reversed(flow.levels[index]):
                x = step.reverse(x)
            x = flow.unsqueeze(x)
            new = _outside(x, bound) & (failed_at < 0)
            if bool(new.any()):
                failed_at[new] = index
                nonfinite_at[new] = ~_finite_rows(x[new])
        return flow.finish(x), failed_at >= 0, failed_at, nonfinite_at

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

    def is_initialized(self) -> bool:
        """True once every ActNorm has been initialised from data."""
        return all(bool(m.initialized) for m in self.modules() if isinstance(m, ActNorm))
