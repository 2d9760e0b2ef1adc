"""ActNorm's data-dependent initialisation before a fresh run's first step, from a fixed subset of
the training split (:func:`initialize_actnorm`)."""

from __future__ import annotations

import torch

from glowflow.config import RunConfig
from glowflow.model import Glow
from glowflow.pixels import dequantization_noise, preprocess
from glowflow.runtime import Distributed
from glowflow.training.seeding import actnorm_seed


@torch.no_grad()
def initialize_actnorm(model: Glow, dataset, run: RunConfig, device: torch.device, dist_ctx: Distributed) -> None:
    """Data-dependent ActNorm init from a fixed subset of >= actnorm_init_images training images.

    The subset is chosen by ``seed``; under torchrun each process takes its share and the
    statistics are averaged across processes (ActNorm.initialize), so every rank starts identical.
    """
    n = actnorm_images(run, len(dataset), dist_ctx.world_size)
    generator = torch.Generator().manual_seed(actnorm_seed(run.seed))
    indices = torch.randperm(len(dataset), generator=generator)[:n]
    n_bits = model.config.n_bits
    noise = dequantization_noise((n, *model.config.image_shape), n_bits, generator)
    share = slice(dist_ctx.rank, None, dist_ctx.world_size)
    images, labels = zip(*(dataset[i] for i in indices[share].tolist()))
    x = preprocess(torch.stack(images), n_bits) + noise[share]
    y = _stack_labels(labels).to(device) if model.config.y_condition else None
    model.initialize(x.to(device), y)


def actnorm_images(run: RunConfig, n_train: int, world_size: int) -> int:
    """How many training images initialise ActNorm: at least --actnorm_init_images and a batch, in
    equal shares for the processes (so the averaged statistics are the global ones)."""
    n = min(n_train, max(run.actnorm_init_images, run.batch_size))
    return n - n % world_size


def _stack_labels(labels) -> torch.Tensor:
    return torch.stack([torch.as_tensor(label) for label in labels])
