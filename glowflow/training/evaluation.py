"""Bits/dim of an evaluation split (:func:`evaluate_bpd`): the validation split that chooses the
best checkpoint, and the test split evaluated for the report."""

from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch
from torch.utils.data import DataLoader

from glowflow.model import Glow
from glowflow.pixels import bits_per_dim, dequantization_noise, preprocess
from glowflow.progress import progress_bar
from glowflow.runtime import Distributed

SPLIT_WORDS = {"val": "validation", "raw_val": "validation (raw weights, without EMA)", "test": "test"}
"""How each evaluated split is named in progress bars and messages."""


def dequantised_batches(
    loader: DataLoader,
    n_bits: int,
    device: torch.device,
    seed: int,
    use_labels: bool,
    max_images: Optional[int] = None,
    desc: str = "eval",
    show: bool = True,
) -> Iterator[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """(x, y) of ``loader``'s images (at most ``max_images``, whole batches): model space, plus
    dequantisation noise from a generator seeded ``seed``, on ``device``; y the labels with
    ``use_labels``, else None. A progress bar (``desc``) when ``show``."""
    generator = torch.Generator().manual_seed(seed)
    seen = 0
    for images, labels in progress_bar(loader, desc=desc, unit="batch", leave=False, disable=not show):
        if max_images is not None and seen >= max_images:
            break
        x = preprocess(images, n_bits)
        x = (x + dequantization_noise(x.shape, n_bits, generator)).to(device, non_blocking=True)
        seen += x.shape[0]
        yield x, (labels.to(device) if use_labels else None)


@torch.inference_mode()
def evaluate_bpd(
    model: Glow,
    loader: DataLoader,
    device: torch.device,
    seed: int = 0,
    use_labels: bool = False,
    dist_ctx: Optional[Distributed] = None,
    max_images: Optional[int] = None,
    desc: str = "eval",
) -> float:
    """Mean bits/dim of ``loader``'s images, dequantised with noise from a generator seeded ``seed``."""
    was_training = model.training
    model.eval()
    n_bits = model.config.n_bits
    total = torch.zeros(2, dtype=torch.float64, device=device)
    show = dist_ctx is None or dist_ctx.is_main
    for x, y in dequantised_batches(loader, n_bits, device, seed, use_labels, max_images, desc, show):
        bpd = bits_per_dim(model.log_prob(x, y), model.num_dims, n_bits)
        total[0] += bpd.double().sum()
        total[1] += bpd.shape[0]
    if dist_ctx is not None:
        dist_ctx.all_sum(total)
    model.train(was_training)
    return (total[0] / total[1].clamp_min(1)).item()
