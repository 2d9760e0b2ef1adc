"""The multi-scale flow's levels and its two loops: :class:`Level` (one level: squeeze, K flow
steps, split) and :class:`FlowLevels` (the L levels over one set of layers, plain or fused: the
forward loop, and the one reverse loop that decoding and checked sampling share).

Both are views: the modules stay where :class:`glowflow.model.Glow` registers them
(``levels[i][k]``, ``splits[i]``), so the state dict's names are those of every checkpoint.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from glowflow.layers import squeeze2x, unsqueeze2x

RunStep = Callable[..., Tuple[torch.Tensor, torch.Tensor]]
"""How a level runs one flow step forward: ``run_step(step, x) -> (y, log|det| (N,))``."""
AfterLevel = Callable[[int, torch.Tensor], None]
"""The reverse loop's hook: ``after_level(index, x)`` with level ``index``'s output (its input
size: (N, C_i, H_i, W_i)), from the last level (the top) down to level 0 (the image)."""


class PlainFlow:
    """The plain layers of a Glow (the reference computation, glowflow/layers.py), with the
    interface of :class:`glowflow.fused.FusedFlow` that the loops use."""

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


class Level:
    """One level of the flow, over the plain or fused layers ``layers``: squeeze (C, H, W) ->
    (4C, H/2, W/2) (log-det 0), ``steps`` (K flow steps, each adding its log-det), then ``split``
    (all but the last level: half the channels leave as a latent with a Gaussian prior conditioned
    on the other half; log-det 0)."""

    def __init__(self, index: int, layers, steps: Sequence, split=None):
        self.index, self.layers, self.steps, self.split = index, layers, steps, split

    def forward(
        self, x: torch.Tensor, run_step: RunStep, priors: bool = True, standardised: bool = False
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
        """x (N, C, H, W) -> (h: what the next level reads, z: the split-off latent (None at the last
        level), log|det| (N,), log-prior of z (N,) (None at the last level or without ``priors``)).
        ``standardised``: z standardised by its prior, (z - mean(h)) / std(h), and no log-prior."""
        x = self.layers.squeeze(x)
        logdet = x.new_zeros(x.shape[0])
        for step in self.steps:
            x, step_logdet = run_step(step, x)
            logdet = logdet + step_logdet
        if self.split is None:
            return x, None, logdet, None
        if standardised:
            x, e = self.split.standardise(x)
            return x, e, logdet, None
        if priors:
            x, z, log_prior = self.split(x)
            return x, z, logdet, log_prior
        x, z = self.split.split(x)
        return x, z, logdet, None

    def reverse(self, h: torch.Tensor, z: Optional[torch.Tensor] = None, temperature: float = 1.0) -> torch.Tensor:
        """The inverse of :meth:`forward`: ``h`` and the latent ``z`` (drawn from its prior at
        ``temperature`` when None) -> the level's input (N, C, H, W)."""
        if self.split is not None:
            h = self.split.reverse(h, z, temperature)
        for step in reversed(self.steps):
            h = step.reverse(h)
        return self.layers.unsqueeze(h)


class FlowLevels:
    """The L levels of a Glow over one set of layers (:class:`PlainFlow` or
    :class:`glowflow.fused.FusedFlow`), and the loops that run them."""

    def __init__(self, layers):
        self.layers = layers
        splits = list(layers.splits)
        self.levels: List[Level] = [
            Level(i, layers, steps, splits[i] if i < len(splits) else None) for i, steps in enumerate(layers.levels)
        ]

    def __len__(self) -> int:
        return len(self.levels)

    def forward(self, x: torch.Tensor, run_step: RunStep, priors: bool = True, standardised: bool = False):
        """The forward loop: (latents (the split-off ones, then the top one), per-level log-dets,
        per-level log-priors of the split latents (empty without ``priors``)), all but the latents (N,).
        ``standardised``: the split-off latents standardised by their priors (Level.forward)."""
        latents, logdets, log_priors = [], [], []
        for level in self.levels:
            x, z, logdet, log_prior = level.forward(x, run_step, priors, standardised)
            logdets.append(logdet)
            if z is not None:
                latents.append(z)
            if log_prior is not None:
                log_priors.append(log_prior)
        latents.append(x)
        return latents, logdets, log_priors

    def reverse(
        self,
        top: torch.Tensor,
        latents: Optional[Sequence[Optional[torch.Tensor]]] = None,
        temperature: float = 1.0,
        after_level: Optional[AfterLevel] = None,
    ) -> torch.Tensor:
        """The one reverse loop: the top latent ``top`` and the split-off ``latents`` (indexed like
        the levels; None, or a None entry, draws that latent from its prior at ``temperature``) ->
        model-space x (N, C, H, W). ``after_level(index, x)`` sees each level's output on the way."""
        x = self.layers.scratch_copy(top)
        for level in reversed(self.levels):
            z = latents[level.index] if latents is not None and level.split is not None else None
            x = level.reverse(x, z, temperature)
            if after_level is not None:
                after_level(level.index, x)
        return self.layers.finish(x)
