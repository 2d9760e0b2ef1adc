"""Checked sampling: the redraw policy and its :class:`SampleReport`, behind :meth:`Glow.sample` /
:meth:`Glow.sample_with_report` (the ``--sample`` command's grids are glowflow/sample.py).

A draw is the reverse loop of glowflow/flow.py from fresh top latents, with a hook that checks
each level's output: a sample with a non-finite value there, or one above ``bound`` in absolute
value, has failed, and is drawn again from the top (at most ``max_rounds`` rounds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch

from glowflow.flow import FlowLevels

SAMPLE_BOUND = 100.0
"""Default bound of :meth:`Glow.sample`'s check: on real images every level's values stay within
about 10 in absolute value (docs/sampling.md); a sample past 100 at a level has left the data's
region and its reverse couplings are amplifying it (it ends non-finite or saturated)."""
SAMPLE_MAX_ROUNDS = 10
"""Default number of rounds in which :meth:`Glow.sample` draws again the samples that failed its check."""

DrawTop = Callable[[int, Optional[torch.Tensor], float], torch.Tensor]
"""``draw_top(n, y, temperature)``: ``n`` top latents from the model's prior."""


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """(N,) bool: the rows of ``x`` whose values are all finite."""
    return torch.isfinite(x).flatten(1).all(dim=1)


def outside(x: torch.Tensor, bound: float) -> torch.Tensor:
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


@torch.no_grad()
def checked_sample(
    levels: FlowLevels,
    draw_top: DrawTop,
    n: int,
    temperature: float = 1.0,
    y: Optional[torch.Tensor] = None,
    redraw: bool = True,
    max_rounds: int = SAMPLE_MAX_ROUNDS,
    bound: float = SAMPLE_BOUND,
) -> Tuple[torch.Tensor, SampleReport]:
    """(samples (n, C, H, W), :class:`SampleReport`): ``n`` draws through ``levels`` from top
    latents of ``draw_top``, the failed ones drawn again (``redraw``, at most ``max_rounds`` rounds).
    The first draw is exactly a plain decode of fresh latents (the same random numbers and values),
    and no random number is used after it when every sample passes."""
    if y is not None and y.shape[0] != n:
        raise ValueError(f"y has {y.shape[0]} rows for {n} samples")
    if not (bound > 0):
        raise ValueError(f"bound must be positive, got {bound}")
    if max_rounds < 0:
        raise ValueError(f"max_rounds must be 0 or more, got {max_rounds}")
    rounds = max_rounds if redraw else 0
    report = SampleReport(n=n, temperature=float(temperature), bound=float(bound), max_rounds=rounds)
    x, failed_at, nonfinite_at = _checked_draw(levels, draw_top, n, y, temperature, bound)
    bad = failed_at >= 0
    report.failed = [int((failed_at == i).sum()) for i in range(len(levels))]
    report.failed_nonfinite = [int((failed_at == i).logical_and(nonfinite_at).sum()) for i in range(len(levels))]
    report.redrawn = int(bad.sum()) if rounds else 0
    for _ in range(rounds):
        if not bool(bad.any()):
            break
        rows = bad.nonzero().squeeze(1)
        report.rounds += 1
        report.redraws += len(rows)
        redo, redo_failed_at, _ = _checked_draw(
            levels, draw_top, len(rows), None if y is None else y[rows], temperature, bound
        )
        x[rows] = redo.to(x.dtype)
        bad[rows] = redo_failed_at >= 0
    report.left = int(bad.sum())
    report.nonfinite = int((~finite_rows(x)).sum())
    return x, report


def _checked_draw(levels: FlowLevels, draw_top: DrawTop, n: int, y, temperature: float, bound: float):
    """One draw of ``n`` samples: (samples (n, C, H, W), the level (n,) int64 where each sample
    first failed the check (-1: none), whether it was a non-finite value there (n,) bool)."""
    top = draw_top(n, y, temperature)
    failed_at = torch.full((n,), -1, dtype=torch.long, device=top.device)
    nonfinite_at = torch.zeros(n, dtype=torch.bool, device=top.device)

    def check(index: int, x: torch.Tensor) -> None:
        new = outside(x, bound) & (failed_at < 0)
        if bool(new.any()):
            failed_at[new] = index
            nonfinite_at[new] = ~finite_rows(x[new])

    return levels.reverse(top, None, temperature, after_level=check), failed_at, nonfinite_at
