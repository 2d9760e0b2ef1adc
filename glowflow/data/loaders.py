"""Feeding a dataset to a model: :func:`make_loader` (a seeded DataLoader) and
:class:`EpochSampler` (training's per-epoch, per-process order, reproducible and resumable)."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from glowflow.config import SEED_STRIDE


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    seed: int = 0,
    device="cpu",
    drop_last: bool = False,
    sampler=None,
) -> DataLoader:
    """A DataLoader with a seeded generator (same order for the same seed), pinned memory only
    when ``device`` is CUDA. With a ``sampler`` the sampler decides the order."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        generator=generator,
        pin_memory=torch.device(device).type == "cuda",
        drop_last=drop_last,
    )


class EpochSampler(Sampler):
    """Indices of one epoch for one process.

    The epoch's order is ``randperm(n)`` seeded by ``(seed, epoch)``; it is cut into global batches
    of ``global_batch`` (an incomplete last batch is dropped when n >= global_batch); process ``rank``
    of ``world_size`` takes positions ``rank::world_size`` of each global batch. ``start_batch``
    skips the batches already done in this epoch (resume).
    """

    def __init__(self, n: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.global_batch = min(global_batch, n)
        self.batches_per_epoch = max(1, n // self.global_batch)
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * SEED_STRIDE + self.epoch)
        order = torch.randperm(self.n, generator=generator)
        for b in range(self.start_batch, self.batches_per_epoch):
            batch = order[b * self.global_batch : (b + 1) * self.global_batch]
            yield from batch[self.rank :: self.world_size].tolist()

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * (self.global_batch // self.world_size)
