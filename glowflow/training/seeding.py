"""The seeds of a training run's random streams, and the draws made from them per optimizer step.

Every stream is seeded ``seed * SEED_STRIDE + offset`` (:data:`glowflow.config.SEED_STRIDE`; the
epoch order's is in :mod:`glowflow.data`), and the per-step draws (dequantisation noise,
augmentation) are made for the whole global batch and then shared out, so N processes with batch
B/N draw what one process with batch B draws, and a resumed run draws what an uninterrupted one
would. Also here: the global random states a checkpoint stores and a resumed run restores.
"""

from __future__ import annotations

import math
from typing import Dict, Tuple

import torch

from glowflow.config import AUGMENT_SHIFT_FRACTION, SEED_STRIDE
from glowflow.pixels import dequantization_noise


def noise_seed(seed: int, step: int) -> int:
    """Dequantisation noise of optimizer step ``step``."""
    return seed * SEED_STRIDE + step


def perturb_seed(seed: int, step: int) -> int:
    """--perturb's pixel replacement in optimizer step ``step``."""
    return seed * SEED_STRIDE + step + 7


def augment_seed(seed: int, step: int) -> int:
    """--augment's shifts and flips in optimizer step ``step``: 2**40 above the step's noise seed,
    away from every other stream of the same run seed."""
    return seed * SEED_STRIDE + step + 2**40


def actnorm_seed(seed: int) -> int:
    """The subset of training images (and their noise) that initialises ActNorm."""
    return seed * SEED_STRIDE - 1


def run_seed_for_samples(seed: int, epoch: int) -> int:
    """The sample grid written after epoch ``epoch``."""
    return seed * SEED_STRIDE + 10_000 + epoch


def rng_state() -> Dict:
    """The global random states a checkpoint stores (torch's, and CUDA's where there is CUDA)."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def set_rng_state(rng: Dict) -> None:
    """Restore what :func:`rng_state` stored (CUDA's only on a machine with as many GPUs)."""
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])


def step_noise(shape, n_bits: int, seed: int, step: int, rank: int, world_size: int, device) -> torch.Tensor:
    """Dequantisation noise U(0, 1/n_bins) of this process's share of global step ``step``."""
    global_shape = (shape[0] * world_size, *shape[1:])
    generator = torch.Generator().manual_seed(noise_seed(seed, step))
    noise = dequantization_noise(global_shape, n_bits, generator)[rank::world_size]
    return noise.to(device, non_blocking=True)


def augment_draws(shape, seed: int, step: int, rank: int, world_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(shifts (N, 2) whole pixels, flips (N,) bools) of this process's share of global step
    ``step`` for images of ``shape`` (N, C, H, W): each shift uniform in -s..s with
    s = max(1, floor(AUGMENT_SHIFT_FRACTION * side)); flips with probability 1/2, and only for RGB
    images. Drawn for the whole global batch from a generator seeded by (seed, step), as the noise is."""
    n, c, h, w = shape
    generator = torch.Generator().manual_seed(augment_seed(seed, step))
    limits = torch.tensor([max(1, math.floor(AUGMENT_SHIFT_FRACTION * side)) for side in (h, w)])
    unit = torch.rand((n * world_size, 2), generator=generator)
    shifts = torch.minimum((unit * (2 * limits + 1)).floor().long() - limits, limits)
    flips = torch.rand(n * world_size, generator=generator) < 0.5
    if c != 3:
        flips = torch.zeros_like(flips)
    return shifts[rank::world_size], flips[rank::world_size]
