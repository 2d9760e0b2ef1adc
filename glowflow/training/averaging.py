"""Polyak averaging of the weights (``--ema``): :class:`WeightAverage`."""

from __future__ import annotations

import torch

from glowflow.model import Glow


class WeightAverage:
    """Polyak averaging (``--ema DECAY``), as openai/glow evaluates its models: a copy of the model
    whose parameters follow ``average = d * average + (1 - d) * weights`` after every optimizer
    step, and whose buffers (ActNorm's initialised flags, shuffle orders, the LU decomposition's
    fixed parts) are copied. It starts from the weights it is made from (after ActNorm's
    initialisation). ``d = min(decay, (1 + t) / (10 + t))`` at step ``t`` (counted from 0), the warm-up
    of TensorFlow's ExponentialMovingAverage: without it the average keeps ``decay**t`` of the
    untrained weights (0.999**858 = 42% after two Fashion-MNIST epochs), and it evaluates far worse
    than the weights it averages."""

    def __init__(self, model: Glow, decay: float):
        self.decay = decay
        self.model = Glow.from_config(model.config).to(next(model.parameters()).device)
        self.model.load_state_dict(model.state_dict())
        self.model.eval()
        self.model.requires_grad_(False)

    def decay_at(self, step: int) -> float:
        """The decay of the update after optimizer step ``step`` (0 for the first)."""
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, model: Glow, step: int) -> None:
        decay = self.decay_at(step)
        average = list(self.model.parameters())
        torch._foreach_mul_(average, decay)
        torch._foreach_add_(average, [p.detach() for p in model.parameters()], alpha=1.0 - decay)
        for mine, theirs in zip(self.model.buffers(), model.buffers()):
            mine.copy_(theirs)
