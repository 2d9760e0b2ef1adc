"""One optimizer step's pieces: the batch as the model sees it (augmented, perturbed, dequantised
with the step's noise), the loss, the check that the step is finite on every process (a
non-finite step is skipped, or rolled back (glowflow/training/rollback.py); too many is
:class:`NonFiniteLoss`), gradient clipping, and the optimizer with its learning-rate warm-up."""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from glowflow.config import RunConfig
from glowflow.errors import GlowflowError
from glowflow.model import Glow, classification_loss
from glowflow.pixels import bits_per_dim, perturb, preprocess, shift_and_flip
from glowflow.runtime import Distributed, autocast_context
from glowflow.training.seeding import augment_draws, perturb_seed, step_noise


class NonFiniteLoss(GlowflowError):
    """The run has diverged: --max_nonfinite_steps skipped steps in a row, a bad step after
    --max_rollbacks rollbacks, or a non-finite validation or test bits/dim."""


def build_optimizer(model: nn.Module, run: RunConfig, steps_per_epoch: int):
    """Adamax on the model's parameters, and a linear learning-rate warm-up over --warmup epochs
    (stepped once per optimizer step)."""
    optimizer = torch.optim.Adamax(model.parameters(), lr=run.lr, weight_decay=run.decay)
    warmup_steps = run.warmup * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    )
    return optimizer, scheduler


def model_inputs(images: torch.Tensor, labels: torch.Tensor, model: Glow, run: RunConfig, step: int, dist_ctx, device):
    """The batch of step ``step`` in model space on ``device``, dequantised with this step's noise
    (and first augmented, with --augment, then perturbed, with --perturb); the labels when the model
    is class-conditional, else None."""
    rank, world_size = dist_ctx.rank, dist_ctx.world_size
    if run.augment:
        shifts, flips = augment_draws(images.shape, run.seed, step, rank, world_size)
        images = shift_and_flip(images, shifts, flips)
    if run.perturb > 0:  # background model of the likelihood-ratio score (Ren et al. 2019)
        generator = torch.Generator().manual_seed(perturb_seed(run.seed, step))
        images = perturb(images, run.perturb, generator)
    n_bits = model.config.n_bits
    x = preprocess(images.to(device, non_blocking=True), n_bits)
    x = x + step_noise(x.shape, n_bits, run.seed, step, rank, world_size, device)
    y = labels.to(device, non_blocking=True) if model.config.y_condition else None
    return x, y


def step_loss(
    step_model: nn.Module, model: Glow, x: torch.Tensor, y: Optional[torch.Tensor], run: RunConfig, device
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The forward pass (under --amp's autocast) through ``step_model`` (``model``, maybe wrapped):
    the loss to minimise (bits/dim, plus --y_weight times the classification loss) and the mean
    bits/dim alone."""
    with autocast_context(device, run.amp):
        log_prob, y_logits = step_model(x, y)
    bpd = bits_per_dim(log_prob.float(), model.num_dims, model.config.n_bits).mean()
    loss = bpd
    if y_logits is not None:
        loss = loss + run.y_weight * classification_loss(y_logits.float(), y, model.config.y_multilabel)
    return loss, bpd


def check_step(
    model: nn.Module, loss: torch.Tensor, bpd: torch.Tensor, dist_ctx: Distributed, weights: bool = False
) -> Tuple[Optional[float], Optional[str]]:
    """(the step's bits/dim averaged over the processes, None) if the loss and every gradient are
    finite on every process, and with ``weights`` every weight the step starts from (what the last
    update left); else (None, what was not finite: "weights", "loss" or "gradient").

    A non-finite step is skipped: a finite loss can still overflow in the backward pass, and one
    such update would poison every weight. This is the step's one host-device synchronisation,
    placed after the backward pass is queued, so a GPU has the whole backward pass to run while
    the host waits; a skipped batch's gradients are dropped by the next step's zero_grad. The
    weights join the same check, so the check of an update costs no synchronisation of its own.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    bad = [~torch.isfinite(loss.detach()), ~torch.isfinite(max_abs(grads))]
    if weights:
        bad.append(~torch.isfinite(max_abs([p.detach() for p in model.parameters()])))
    # (processes with a non-finite loss, ... gradient, [... weights], summed bits/dim): every process
    # skips together, or none does
    summed = torch.stack([*(b.double().to(bpd.device) for b in bad), bpd.detach().double()])
    if dist_ctx.enabled:
        dist.all_reduce(summed)
    *counts, bpd_sum = summed.tolist()
    failed = [what for what, count in zip(("loss", "gradient", "weights"), counts) if count]
    if not failed:
        return bpd_sum / dist_ctx.world_size, None
    return None, "weights" if "weights" in failed else failed[0]  # bad weights make the rest bad


def weights_finite(model: nn.Module, dist_ctx: Distributed) -> bool:
    """Whether every weight of ``model`` is finite on every process (one synchronisation)."""
    bad = ~torch.isfinite(max_abs([p.detach() for p in model.parameters()]))
    return not dist_ctx.all_sum(bad.double().reshape(1)).item()


def max_abs(tensors: List[torch.Tensor]) -> torch.Tensor:
    """max |t| over a list of tensors, as a 0-d tensor on their device (NaN if any is NaN; 0 for
    an empty list). Never overflows, unlike the 2-norm, so it is inf only for an infinite entry."""
    if not tensors:
        return torch.zeros(())
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6: fused, one kernel per device
        return torch.nn.utils.get_total_norm(tensors, norm_type=math.inf)
    return torch.stack([t.detach().abs().max() for t in tensors]).max()


def clip_gradients(model: nn.Module, run: RunConfig) -> None:
    """--max_grad_clip (per value), then --max_grad_norm (total 2-norm); 0 turns either off."""
    if run.max_grad_clip > 0:
        torch.nn.utils.clip_grad_value_(model.parameters(), run.max_grad_clip)
    if run.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), run.max_grad_norm)
