"""What a training run says and records: its cost (refused before the first step when a pass would
not fit in memory) and one-line introduction, each epoch's line and metrics.csv row, each
rollback's line and row, and the tracker (metrics.csv, wandb, TensorBoard) that records them."""

from __future__ import annotations

import os
import sys
from typing import Dict, Optional

import torch

from glowflow.config import RunConfig
from glowflow.cost import RunCost
from glowflow.curves import RunningLoss
from glowflow.errors import GlowflowError
from glowflow.model import Glow
from glowflow.runtime import Distributed
from glowflow.tracking import Tracker
from glowflow.training.actnorm_init import actnorm_images
from glowflow.training.rollback import Rollback


def estimate_cost(
    model: Glow, run: RunConfig, n_train: int, steps_per_epoch: int, global_batch: int, start: int, initialise: bool,
    device: torch.device, dist: Distributed,
) -> RunCost:  # fmt: skip
    """What the run will cost from optimizer step ``start`` (``initialise``: ActNorm is initialised
    first); GlowflowError on every process when a pass would not fit in memory."""
    batch = global_batch // dist.world_size
    init_images = actnorm_images(run, n_train, dist.world_size) // dist.world_size if initialise else 0
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if device.type == "cpu" else 1
    n_params = sum(p.numel() for p in model.parameters())
    cost = RunCost.estimate(
        model.config, n_params, n_train, steps_per_epoch, run, start, batch, init_images, device, sharing
    )
    too_big = dist.all_sum(torch.tensor([0 if cost.fits() else 1], device=device))
    if too_big.item():  # every process stops, so none waits for the others
        cost.check_memory()
        raise GlowflowError(f"{too_big.item()} process(es) of this run would not fit in their memory")
    return cost


def print_header(dataset_name: str, splits, val_size: int, model: Glow, where: str, cost: RunCost) -> None:
    """The run's one-line introduction (data ``splits`` (train, val or None, test), model size,
    ``where``: device, processes and output folder) and its cost; after a note when the data had no
    test split of its own, or the run has no validation split, and before one when its epochs end
    before --max_steps."""
    train_set, val_set, test_set = splits
    held_out_from = getattr(test_set, "held_out_from", None)
    if held_out_from is not None:
        print(
            f"note: {dataset_name} has no test split of its own: its {held_out_from} images are split "
            f"{len(train_set)} train / {val_size} validation / {len(test_set)} test (a fixed partition)",
            file=sys.stderr,
        )
    if val_set is None:
        print("note: no validation split (--val_size 0): the best checkpoint is the last epoch's", file=sys.stderr)
    c, h, w = model.config.image_shape
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"glowflow: training on {dataset_name} ({len(train_set)} train / "
        f"{len(val_set) if val_set is not None else 0} val / {len(test_set)} test, "
        f"{c}x{h}x{w}), {n_params / 1e6:.2f}M parameters, {where}"
    )
    print(cost.describe())
    if cost.epochs_end_first():
        print(cost.epochs_end_first(), file=sys.stderr)


def metrics_row(epoch: int, step: int, loss: RunningLoss, scores: Dict[str, Optional[float]], lr: float) -> Dict:
    """The epoch's metrics.csv row (and tracker entry); ``epoch``: the epochs completed. The
    training bits/dim, images/s and seconds are the whole epoch's so far (``loss``), resumed or not.
    A split not evaluated (no validation split; raw weights without --ema) is left empty."""
    return {
        "epoch": epoch,
        "step": step,
        "train_bpd": round(loss.epoch_mean(), 6),
        **{f"{split}_bpd": (None if value is None else round(value, 6)) for split, value in scores.items()},
        "lr": lr,
        "images_per_s": round(loss.epoch_images / max(loss.epoch_seconds, 1e-9), 2),
        "seconds": round(loss.epoch_seconds, 3),
    }


def print_epoch(row: Dict, n_epochs: int, improved: bool, nonfinite_total: int, rollbacks: int = 0) -> None:
    """The epoch's line on stdout, after a note on stderr when steps have been skipped (and
    ``rollbacks`` made): train, validation (the raw weights' too, with --ema) and test bits/dim."""
    if nonfinite_total or rollbacks:
        rolled = f", {rollbacks} rollback(s)" if rollbacks else ""
        print(
            f"note: {nonfinite_total} step(s) skipped so far for a non-finite loss or gradient{rolled}", file=sys.stderr
        )
    parts = [f"epoch {row['epoch']}/{n_epochs}", f"step {row['step']}", f"train {row['train_bpd']:.4f} bpd"]
    if row["val_bpd"] is not None:
        parts.append(f"val {row['val_bpd']:.4f} bpd{' (best)' if improved else ''}")
    if row["raw_val_bpd"] is not None:
        parts.append(f"val without EMA {row['raw_val_bpd']:.4f} bpd")
    parts.append(f"test {row['test_bpd']:.4f} bpd")
    parts += [f"lr {row['lr']:.2e}", f"{row['images_per_s']:.0f} img/s", f"{row['seconds']:.1f} s"]
    print("  ".join(parts))


def rollback_event(step: int, what: str, restored: int, rollback: Rollback) -> str:
    """What rollback ``rollback.count``, after the bad step ``step``, did: its printed note and its
    metrics.csv row's ``event``."""
    cooldown = rollback.cooldown_until - step
    return (
        f"step {step}: non-finite {what}; restored the state of step {restored}, learning rate "
        f"x{rollback.lr_scale(step):g} for {cooldown} steps (rollback {rollback.count} of {rollback.max_rollbacks})"
    )


def event_row(epoch: int, step: int, lr: float) -> Dict:
    """The metrics.csv row of an event between two evaluations (a rollback): where it happened
    (``epoch``: the epochs completed) and the learning rate it left; no bits/dim."""
    return {"epoch": epoch, "step": step, "lr": lr}


def print_note(line: str, bar=None) -> None:
    """``line`` on stderr, above the progress ``bar`` when it is tqdm's (which would otherwise draw over it)."""
    write = getattr(bar, "write", None)
    if write is not None:
        write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr)


def make_tracker(
    run: RunConfig, model: Glow, output_dir: str, dataset_name: str, epoch: int, step: int, steps_per_epoch: int
) -> Tracker:
    """metrics.csv, plus wandb and/or TensorBoard as the flags say; when resuming, appends after
    the rows up to the resumed checkpoint's ``epoch`` and ``step``."""
    config = {**run.to_dict(), **{f"model/{k}": v for k, v in model.config.to_dict().items()}}
    return Tracker(
        output_dir,
        use_wandb=not run.no_wandb,
        use_tensorboard=run.tensorboard,
        run_name=f"Glow_{dataset_name}",
        config=config,
        resume=bool(run.resume),
        resume_at=(epoch, step),
        partial=step > epoch * steps_per_epoch,
        steps_per_epoch=steps_per_epoch,
    )
