"""The training loop of glowflow: one process or many (torchrun + DistributedDataParallel), CPU or GPU.

This file owns :func:`train` (the ``--train`` command), the :class:`Trainer` it runs, and the pieces
only training needs: the per-step dequantisation noise and augmentation, ActNorm's data-dependent
initialisation, Polyak averaging of the weights (:class:`WeightAverage`, ``--ema``), bits/dim of an
evaluation split, and what a resumed run keeps from its checkpoint (:data:`RESUME_OVERRIDES`).

Three splits: the training split (less its validation part), the validation split (``--val_size``
images carved from the training split, :func:`glowflow.data.split_validation`), which alone chooses
the best checkpoint, and the test split, evaluated every epoch for the report and never used to
choose anything. With ``--val_size 0`` the best checkpoint is the last epoch's.

Reproducibility is built in rather than bolted on: the data order of epoch ``e`` is a permutation
seeded by ``(seed, e)``, the dequantisation noise of optimizer step ``s`` is drawn from a generator
seeded by ``(seed, s)`` for the whole global batch, and ActNorm is initialised from a fixed subset
of the training set. A run stopped anywhere (``--max_steps``, Ctrl-C) and resumed from ``last.pt``
therefore ends with the same weights as an uninterrupted run, and N processes with per-process
batch B/N reproduce one process with batch B.

Before the first step, one line says what the run will cost (:class:`glowflow.cost.RunCost`), and
a run estimated to need more memory than the device has free is refused. Per step, the training
bits/dim on a progress bar (:func:`glowflow.progress.progress_bar`) and every few steps in
steps.csv (:mod:`glowflow.curves`). Per epoch: the validation and test splits' bits/dim (fixed noise seed; with
``--ema`` also the raw weights' validation bits/dim), ``Glow_<dataset>.pt`` when the validation
bits/dim improves, a metrics.csv row, a sample grid every ``sample_and_save_freq`` epochs,
and ``last.pt`` last of all: ``last.pt`` is the commit point. A run killed anywhere resumes from it
and writes again, identically, whatever came after it; metrics.csv rows beyond it are dropped on
resume (:class:`glowflow.tracking.Tracker`).

What else keeps a run from losing work or reporting a wrong result:

* :class:`glowflow.runfolder.RunFolder` -- one run at a time per output folder (a lock held by
  rank 0 for the whole run); a new run is refused where a previous run left its work unless
  ``--overwrite``; temporary files an interrupted write left are removed once the lock is held; a
  run that fails before its first checkpoint removes what it wrote;
* :class:`StopSignals` -- SIGINT (Ctrl-C) and SIGTERM (Slurm) stop a run at the next point where
  its state is whole (between optimizer steps; after the end-of-epoch writes), and ``last.pt`` is
  saved; a second signal stops at once without saving;
* divergence -- non-finite steps are skipped, and ``--max_nonfinite_steps`` of them in a row (counted
  across epochs and resumes) or a non-finite test bits/dim stop the run (:class:`NonFiniteLoss`)
  before a diverged model overwrites a checkpoint;
* :func:`check_labels` -- class labels that a class-conditional model cannot take are refused when
  the data is loaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sys
import threading
import time
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from glowflow import data as data_module
from glowflow.checkpoint import Checkpoint, save_checkpoint
from glowflow.config import AUGMENT_SHIFT_FRACTION, SEED_STRIDE, GlowConfig, RunConfig, dataset_slug
from glowflow.cost import RunCost
from glowflow.curves import RunningLoss, curve_interval
from glowflow.data import EpochSampler
from glowflow.errors import GlowflowError
from glowflow.model import Glow, classification_loss
from glowflow.pixels import bits_per_dim, dequantization_noise, perturb, preprocess, save_grid, shift_and_flip
from glowflow.progress import progress_bar
from glowflow.runfolder import LOCK_NAME, RunFolder, RunLock  # noqa: F401 (RunLock, LOCK_NAME: importable from here)
from glowflow.runtime import Distributed, autocast_context, compile_model, resolve_device
from glowflow.tracking import Tracker


def train(run: RunConfig, model_config: Optional[GlowConfig] = None) -> Dict:
    """Train (or resume) as ``run`` says; returns a summary dict. A run that fails (an error or an
    interruption) before it wrote a checkpoint removes what it wrote (RunFolder.release)."""
    trainer = Trainer(run, model_config)
    try:
        return trainer.fit()
    except (Exception, KeyboardInterrupt):
        trainer.close(failed=True)
        raise
    finally:
        trainer.close()


class NonFiniteLoss(GlowflowError):
    """The run has diverged: --max_nonfinite_steps skipped steps in a row, or a non-finite
    validation or test bits/dim."""


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    """The model, optimizer, data and bookkeeping of one training run.

    Three handles on the model:

    * ``self.model`` -- the bare :class:`Glow` being trained (the raw weights). ActNorm
      initialisation, gradient clipping and the optimizer use it.
    * ``self.eval_model`` -- what evaluation, sampling and the checkpoints' ``model`` weights use:
      the Polyak average of ``self.model`` with ``--ema`` (``self.average.model``), else
      ``self.model`` itself. With ``--ema`` checkpoints also keep the raw weights (``raw_model``),
      which a resumed run trains on.
    * ``self.step_model`` -- the module :meth:`train_step` calls for the forward pass: ``self.model``
      wrapped in DistributedDataParallel (under torchrun) and/or torch.compile (``--compile``), or
      the very same object as ``self.model`` when neither applies.
    """

    def __init__(self, run: RunConfig, model_config: Optional[GlowConfig] = None):
        run.validate()
        self.device = resolve_device(run.device)
        self.dist = Distributed(self.device)
        self.run, model_config, resumed = self._restore_run(run, model_config)
        self.output_dir = self.run.resolved_output_dir()
        self.folder = RunFolder(self.output_dir)
        self.folder.check_unused(resuming=resumed is not None, overwrite=self.run.overwrite)  # before any work
        self.dataset_name = dataset_slug(self.run.dataset)
        self.train_set, self.val_set, self.test_set = self._load_data(model_config)
        torch.manual_seed(self.run.seed)  # a fresh model's initial weights follow from --seed
        self.model = self._build_model(model_config, resumed)
        self.model.grad_checkpoint = self.run.grad_checkpoint
        self.sampler, self.steps_per_epoch = self._build_sampler()
        self.cost = self._estimate_cost(resumed)  # refused here if it cannot fit in memory
        if self.dist.is_main:  # after data and model are found good, so a bad input leaves no empty folder
            self.folder.claim(overwrite=self.run.overwrite)
        try:
            if self.dist.is_main:
                self._print_header()
            self.optimizer, self.scheduler = self._build_optimizer()
            self.loss = RunningLoss()  # the current epoch's training bits/dim so far
            self.epoch, self.step, self.best_val_bpd, self.nonfinite_total = 0, 0, math.inf, 0
            self.test_at_best = math.inf  # the test bits/dim of the checkpoint chosen so far (reported only)
            self.nonfinite_in_a_row = 0  # skipped steps since the last good one, across epochs
            # the newest checkpoint this run can go back to: the resumed file, then each last.pt saved
            self.last_good: Optional[str] = self.run.resume
            self.saved_at: Optional[Tuple[int, int]] = None  # (epoch, step) of the last.pt this run wrote
            if resumed is not None:
                self._restore_training_state(resumed)
            elif not self.model.is_initialized():
                initialize_actnorm(self.model, self.train_set, self.run, self.device, self.dist)
            # after ActNorm's initialisation, so the average starts from the initialised weights
            self.average = WeightAverage(self.model, self.run.ema) if self.run.ema > 0 else None
            if self.average is not None and resumed is not None and resumed.averaged_weights is not None:
                self.average.model.load_state_dict(resumed.averaged_weights)
            self.step_model = self._wrap_for_training()  # DDP- and/or compile-wrapped self.model, or self.model itself
            self.train_loader, self.val_loader, self.test_loader = self._build_loaders()
        except BaseException as err:
            self.close(failed=isinstance(err, (Exception, KeyboardInterrupt)))
            raise
        self.tracker: Optional[Tracker] = None  # opened by fit(), on the main process only
        self.signals = StopSignals()

    def close(self, failed: bool = False) -> None:
        """Release the output folder (``failed``: removing what the run wrote if it wrote no
        checkpoint) and leave the process group (both safe to repeat)."""
        self.folder.release(failed)
        self.dist.close()

    # -------------------------------------------------------------- assembling a run

    def _restore_run(
        self, run: RunConfig, model_config: Optional[GlowConfig]
    ) -> Tuple[RunConfig, GlowConfig, Optional[Checkpoint]]:
        """The run configuration and architecture to train, and the checkpoint resumed from (if any).

        A fresh run takes ``run`` and ``model_config`` as given. With ``--resume`` both come from
        the checkpoint, except the fields of RESUME_OVERRIDES, which the command line still sets.
        """
        if not run.resume:
            if model_config is None:
                raise GlowflowError("no model configuration given")
            return run, model_config, None
        resumed = Checkpoint.read(run.resume)
        if resumed.is_folder:
            raise GlowflowError(
                f"{run.resume} is a model folder (config.json + model.safetensors): it holds no training state "
                f"(optimizer, counters, random states) and cannot be resumed; resume from the run's last.pt"
            )
        if not resumed.has_training_state:
            raise GlowflowError(f"{run.resume} holds no training state (optimizer); it cannot be resumed")
        run = resumed_config(resumed.run_config, run)
        run.validate()
        return run, resumed.model_config, resumed

    @property
    def eval_model(self) -> Glow:
        """The weights evaluation, sampling and the checkpoints' ``model`` use: the Polyak average
        with --ema, else the trained weights themselves."""
        return self.average.model if self.average is not None else self.model

    def _load_data(self, model_config: GlowConfig):
        """The training, validation (None with --val_size 0) and test splits of --dataset, checked
        against the model's image shape. The validation split is carved from the training split
        (--val_size images drawn by --seed); its size is recorded in self.run, hence in every
        checkpoint's run_config."""
        run = self.run
        divisor = 2**model_config.L
        train_set = data_module.load_dataset(
            run.dataset, "train", data_root=run.data_root, image_size=run.image_size, divisor=divisor
        )
        test_set = data_module.load_dataset(
            run.dataset, "test", data_root=run.data_root, image_size=run.image_size, divisor=divisor
        )
        data_shape = tuple(train_set.info.image_shape)
        if tuple(model_config.image_shape) != data_shape:
            raise GlowflowError(f"model image shape {model_config.image_shape} does not match the data's {data_shape}")
        check_labels(train_set, model_config, "training")
        check_labels(test_set, model_config, "test")
        val_size = data_module.resolve_val_size(run.val_size, len(train_set), self.dataset_name)
        self.run = dataclasses.replace(run, val_size=val_size)
        train_set, val_set, _ = data_module.split_validation(train_set, val_size, run.seed)
        return train_set, val_set, test_set

    def _estimate_cost(self, resumed: Optional[Checkpoint]) -> RunCost:
        """What the run will cost; GlowflowError on every process when a pass would not fit in memory."""
        batch = self.sampler.global_batch // self.dist.world_size
        init_images = 0
        if resumed is None and not self.model.is_initialized():
            init_images = actnorm_images(self.run, len(self.train_set), self.dist.world_size) // self.dist.world_size
        sharing = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if self.device.type == "cpu" else 1
        n_params = sum(p.numel() for p in self.model.parameters())
        start = resumed.step if resumed is not None else 0
        cost = RunCost.estimate(
            self.model.config, n_params, len(self.train_set), self.steps_per_epoch, self.run, start, batch,
            init_images, self.device, sharing,
        )  # fmt: skip
        too_big = self.dist.all_sum(torch.tensor([0 if cost.fits() else 1], device=self.device))
        if too_big.item():  # every process stops, so none waits for the others
            cost.check_memory()
            raise GlowflowError(f"{too_big.item()} process(es) of this run would not fit in their memory")
        return cost

    def _build_model(self, model_config: GlowConfig, resumed: Optional[Checkpoint]) -> Glow:
        """A new Glow of ``model_config``, or the resumed checkpoint's, on the training device."""
        model = Glow.from_config(model_config) if resumed is None else resumed.build_model()
        return model.to(self.device)

    def _build_sampler(self) -> Tuple[EpochSampler, int]:
        """The sampler of the training batches (this process's share of each global batch) and the
        number of optimizer steps per epoch."""
        sampler = EpochSampler(
            len(self.train_set), self.run.batch_size, self.run.seed, self.dist.rank, self.dist.world_size
        )
        if sampler.global_batch % self.dist.world_size:
            raise GlowflowError(
                f"batch size {sampler.global_batch} is not divisible by the {self.dist.world_size} processes"
            )
        return sampler, sampler.batches_per_epoch

    def _build_optimizer(self):
        """Adamax on the model's parameters, and a linear learning-rate warm-up over --warmup epochs
        (stepped once per optimizer step)."""
        run = self.run
        optimizer = torch.optim.Adamax(self.model.parameters(), lr=run.lr, weight_decay=run.decay)
        warmup_steps = run.warmup * self.steps_per_epoch
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        )
        return optimizer, scheduler

    def _restore_training_state(self, resumed: Checkpoint) -> None:
        """Continue where the checkpoint stopped: optimizer, scheduler, counters and RNG states
        (each checked by the Checkpoint accessor that reads it)."""
        self.optimizer.load_state_dict(resumed.optimizer_state)
        self.scheduler.load_state_dict(resumed.scheduler_state)
        self.epoch = resumed.epoch
        self.step = resumed.step
        self.best_val_bpd = resumed.best_val_bpd
        self.test_at_best = resumed.best_test_bpd
        self.nonfinite_total = resumed.nonfinite_steps
        self.nonfinite_in_a_row = resumed.nonfinite_in_a_row
        self.loss = RunningLoss.from_checkpoint(resumed.payload.get("running_loss"), resumed.path)
        rng = resumed.rng_state
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def _wrap_for_training(self) -> nn.Module:
        """``self.model`` in DistributedDataParallel under torchrun, then in torch.compile with
        --compile; ``self.model`` itself when neither applies. Runs after ActNorm's initialisation,
        which compiling requires."""
        wrapped: nn.Module = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = DistributedDataParallel(wrapped, device_ids=ids)
        if self.run.compile:
            wrapped = compile_model(wrapped)
        return wrapped

    def _build_loaders(self) -> Tuple[DataLoader, Optional[DataLoader], DataLoader]:
        """The training loader (batches from self.sampler), and the validation (None without a
        validation split) and test loaders (each process takes every world_size-th image)."""
        run = self.run
        train_loader = data_module.make_loader(
            self.train_set,
            batch_size=self.sampler.global_batch // self.dist.world_size,
            shuffle=False,
            num_workers=run.num_workers,
            seed=run.seed,
            device=self.device,
            sampler=self.sampler,
        )
        val_loader = self._evaluation_loader(self.val_set) if self.val_set is not None else None
        return train_loader, val_loader, self._evaluation_loader(self.test_set)

    def _evaluation_loader(self, dataset) -> DataLoader:
        """A loader of ``dataset`` in order; under torchrun each process takes every world_size-th image."""
        sampler = None
        if self.dist.enabled:
            sampler = list(range(len(dataset)))[self.dist.rank :: self.dist.world_size]
        return data_module.make_loader(
            dataset,
            batch_size=self.run.eval_batch_size,
            shuffle=False,
            num_workers=self.run.num_workers,
            seed=self.run.seed,
            device=self.device,
            sampler=sampler,
        )

    # -------------------------------------------------------------- the loop

    def fit(self) -> Dict:
        """Train epoch by epoch until --n_epochs or --max_steps; SIGINT (Ctrl-C) and SIGTERM save
        last.pt first."""
        run = self.run
        if self.dist.is_main:
            self.tracker = self._make_tracker()
        stopped_early = False
        self.signals.install()
        try:
            while self.epoch < run.n_epochs and not stopped_early:
                stopped_early = self._run_epoch()
        except KeyboardInterrupt:
            self._save_on_interrupt()
            raise
        finally:
            self.signals.restore()
            if self.tracker is not None:
                self.tracker.close()
        summary = {
            "epoch": self.epoch,
            "step": self.step,
            "chosen_on": "validation" if self.val_loader is not None else "last epoch",
            "best_val_bpd": self.best_val_bpd,
            "test_bpd": self.test_at_best,
            "nonfinite_steps": self.nonfinite_total,
            "output_dir": self.output_dir,
        }
        self.dist.barrier()
        return summary

    def _save_on_interrupt(self) -> None:
        """last.pt of the current state (unless this run just wrote it), and the line saying so; when
        a second signal broke into an update, the state may be half changed: nothing is saved."""
        if not self.dist.is_main:
            return
        if self.signals.broke_in:
            kept = f"the last good checkpoint is {self.last_good}" if self._last_good_exists() else "no checkpoint kept"
            print(
                f"\ninterrupted again before step {self.step} was saved: last.pt not updated; {kept}", file=sys.stderr
            )
            return
        path = (
            self._save_last() if self.saved_at != (self.epoch, self.step) else os.path.join(self.output_dir, "last.pt")
        )
        print(f"\ninterrupted at step {self.step}: saved {path} (continue with --resume {path})", file=sys.stderr)

    def _run_epoch(self) -> bool:
        """Train the rest of the current epoch, then evaluate, record, save and report it;
        True if --max_steps stopped it early.

        The best checkpoint is the one with the lowest validation bits/dim (the last epoch's without
        a validation split); the test split is evaluated for the report only. The end-of-epoch
        writes come in an order that a kill at any point cannot spoil: the best checkpoint (when
        improved), the metrics row, the sample grid, and last.pt, the commit point, last. A run
        resumed from an earlier last.pt writes all of them again, identically. A stop signal waits
        for the commit.
        """
        stopped_early = self._run_steps()
        with self.signals.held("finishing this epoch's evaluation and checkpoints before stopping"):
            epoch = self.epoch + 1 if self.step >= (self.epoch + 1) * self.steps_per_epoch else self.epoch
            scores = self.evaluate()  # collective under torchrun: every process evaluates
            for split, value in scores.items():
                if value is not None and not math.isfinite(value):
                    raise self._diverged(f"the {SPLIT_WORDS[split]} bits/dim after step {self.step} is {value}")
            val_bpd, test_bpd = scores["val"], scores["test"]
            improved = val_bpd is None or val_bpd < self.best_val_bpd  # no validation split: the last epoch
            best_val_bpd = (val_bpd if val_bpd is not None else math.inf) if improved else self.best_val_bpd
            test_at_best = test_bpd if improved else self.test_at_best
            row = self._metrics_row(epoch, scores)
            carried = RunningLoss() if epoch > self.epoch else self.loss  # what resuming from here continues
            if self.dist.is_main:
                rng = rng_state()  # last.pt's, as it was before the sample grid reseeded torch
                if improved:
                    fields = dict(best_val_bpd=best_val_bpd, test_bpd_at_best=test_at_best)
                    self.save(self.best_name, epoch=epoch, running_loss=carried.to_dict(), **fields)
                self.tracker.log_epoch(row)
                self._print_epoch(epoch, row, improved)
                freq = self.run.sample_and_save_freq
                if epoch > self.epoch and freq > 0 and epoch % freq == 0:
                    path = self.save_samples(epoch)
                    self.tracker.log_image(self.step, "samples", path)
            self.epoch, self.best_val_bpd, self.test_at_best = epoch, best_val_bpd, test_at_best
            self.loss = carried
            if self.dist.is_main:
                self._save_last(rng=rng)
        return stopped_early

    def _run_steps(self) -> bool:
        """train_step over the current epoch's remaining batches (all of them unless resumed mid-epoch),
        with a progress bar and the step curve's points; True if it stopped at --max_steps. Raises
        NonFiniteLoss after --max_nonfinite_steps skipped steps in a row (counted across epochs)."""
        run = self.run
        self.sampler.set_epoch(self.epoch, start_batch=self.step - self.epoch * self.steps_per_epoch)
        self.model.train()
        desc, show = f"epoch {self.epoch + 1}/{run.n_epochs}", self.dist.is_main
        bar = progress_bar(self.train_loader, total=len(self.train_loader), desc=desc, unit="step", disable=not show)
        stopped_early, clock = False, time.perf_counter()
        for images, labels in bar:
            with self.signals.held():  # a stop signal waits for the step to be applied, counted and logged
                bpd = self.train_step(images, labels)
                self.step += 1  # batches consumed: a skipped batch counts, so data order and noise stay aligned
                if bpd is None:
                    self.nonfinite_in_a_row += 1
                    self.nonfinite_total += 1
                else:
                    self.nonfinite_in_a_row = 0
                    self.loss.add(bpd, images.shape[0] * self.dist.world_size)
                self.loss.epoch_seconds += time.perf_counter() - clock
                clock = time.perf_counter()
                self._log_curve_point()
            if bpd is None:
                if self.nonfinite_in_a_row >= run.max_nonfinite_steps:
                    bar.close()
                    raise self._diverged(
                        f"{self.nonfinite_in_a_row} non-finite losses or gradients in a row at step {self.step}"
                    )
                continue
            images_per_s = self.loss.epoch_images / max(self.loss.epoch_seconds, 1e-9)
            bar.set_postfix(refresh=False, bpd=f"{self.loss.epoch_mean():.3f}", img_s=f"{images_per_s:.0f}")
            if run.max_steps is not None and self.step >= run.max_steps:
                stopped_early = True
                break
        bar.close()
        return stopped_early

    def _log_curve_point(self) -> None:
        """A row of steps.csv (main process) when this step ends a point of the curve: every
        curve_interval steps of an epoch, and its last step."""
        into_epoch = self.step - self.epoch * self.steps_per_epoch
        if into_epoch % curve_interval(self.steps_per_epoch) and into_epoch < self.steps_per_epoch:
            return
        mean = self.loss.take_point()
        if mean is not None and self.tracker is not None:
            self.tracker.log_step(self.step, self.step / self.steps_per_epoch, mean)

    def evaluate(self) -> Dict[str, Optional[float]]:
        """Bits/dim of the evaluation model (the averaged weights with --ema) on the validation
        split ("val"; None without one) and the test split ("test"), and of the raw weights on the
        validation split ("raw_val"; None without --ema or a validation split). Noise seeded by
        --eval_seed, at most --max_eval_images images each."""
        scores: Dict[str, Optional[float]] = {"val": None, "test": None, "raw_val": None}
        if self.val_loader is not None:
            scores["val"] = self.evaluate_split(self.eval_model, self.val_loader, "val")
            if self.average is not None:
                scores["raw_val"] = self.evaluate_split(self.model, self.val_loader, "raw_val")
        scores["test"] = self.evaluate_split(self.eval_model, self.test_loader, "test")
        return scores

    def evaluate_split(self, model: Glow, loader: DataLoader, split: str) -> float:
        """Mean bits/dim of ``model`` on ``loader``'s images (``split``: "val", "raw_val" or "test")."""
        return evaluate_bpd(
            model,
            loader,
            self.device,
            self.run.eval_seed,
            use_labels=model.config.y_condition,
            dist_ctx=self.dist,
            max_images=self.run.max_eval_images,
            desc=f"{SPLIT_WORDS[split]} bits/dim",
        )

    def _metrics_row(self, epoch: int, scores: Dict) -> Dict:
        """The epoch's metrics.csv row (and tracker entry); ``epoch``: the epochs completed. The
        training bits/dim, images/s and seconds are the whole epoch's so far, resumed or not. A split
        not evaluated (no validation split; raw weights without --ema) is left empty."""
        loss = self.loss
        return {
            "epoch": epoch,
            "step": self.step,
            "train_bpd": round(loss.epoch_mean(), 6),
            **{f"{split}_bpd": (None if value is None else round(value, 6)) for split, value in scores.items()},
            "lr": self.optimizer.param_groups[0]["lr"],
            "images_per_s": round(loss.epoch_images / max(loss.epoch_seconds, 1e-9), 2),
            "seconds": round(loss.epoch_seconds, 3),
        }

    def _print_header(self) -> None:
        """The run's one-line introduction (data, model size, device, processes, output folder) and
        its cost; after a note when the data had no test split of its own, or the run has no
        validation split, and before one when its epochs end before --max_steps."""
        held_out_from = getattr(self.test_set, "held_out_from", None)
        if held_out_from is not None:
            print(
                f"note: {self.dataset_name} has no test split of its own: its {held_out_from} images are split "
                f"{len(self.train_set)} train / {self.run.val_size} validation / {len(self.test_set)} test "
                f"(a fixed partition)",
                file=sys.stderr,
            )
        if self.val_set is None:
            print("note: no validation split (--val_size 0): the best checkpoint is the last epoch's", file=sys.stderr)
        c, h, w = self.model.config.image_shape
        n_params = sum(p.numel() for p in self.model.parameters())
        print(
            f"glowflow: training on {self.dataset_name} ({len(self.train_set)} train / "
            f"{len(self.val_set) if self.val_set is not None else 0} val / {len(self.test_set)} test, "
            f"{c}x{h}x{w}), {n_params / 1e6:.2f}M parameters, device {self.device}, "
            f"{self.dist.world_size} process(es), output {self.output_dir}"
        )
        print(self.cost.describe())
        if self.cost.epochs_end_first():
            print(self.cost.epochs_end_first(), file=sys.stderr)

    def _print_epoch(self, epoch: int, row: Dict, improved: bool) -> None:
        """The epoch's line on stdout, after a note on stderr when steps have been skipped:
        train, validation (the raw weights' too, with --ema) and test bits/dim."""
        if self.nonfinite_total:
            print(
                f"note: {self.nonfinite_total} step(s) skipped so far for a non-finite loss or gradient",
                file=sys.stderr,
            )
        parts = [f"epoch {epoch}/{self.run.n_epochs}", f"step {self.step}", f"train {row['train_bpd']:.4f} bpd"]
        if row["val_bpd"] is not None:
            parts.append(f"val {row['val_bpd']:.4f} bpd{' (best)' if improved else ''}")
        if row["raw_val_bpd"] is not None:
            parts.append(f"val without EMA {row['raw_val_bpd']:.4f} bpd")
        parts.append(f"test {row['test_bpd']:.4f} bpd")
        parts += [f"lr {row['lr']:.2e}", f"{row['images_per_s']:.0f} img/s", f"{row['seconds']:.1f} s"]
        print("  ".join(parts))

    def _make_tracker(self) -> Tracker:
        """metrics.csv, plus wandb and/or TensorBoard as the flags say; when resuming, appends after
        the rows up to the resumed checkpoint's epoch and step."""
        config = {**self.run.to_dict(), **{f"model/{k}": v for k, v in self.model.config.to_dict().items()}}
        return Tracker(
            self.output_dir,
            use_wandb=not self.run.no_wandb,
            use_tensorboard=self.run.tensorboard,
            run_name=f"Glow_{self.dataset_name}",
            config=config,
            resume=bool(self.run.resume),
            resume_at=(self.epoch, self.step),
            partial=self.step > self.epoch * self.steps_per_epoch,
            steps_per_epoch=self.steps_per_epoch,
        )

    # -------------------------------------------------------------- one step

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> Optional[float]:
        """One optimizer step on a batch of raw images: its mean bits/dim (over every process's
        share), or None when the step was skipped for a non-finite loss or gradient. Counting the
        step is the caller's job."""
        x, y = self._model_inputs(images, labels)
        loss, bpd = self._loss(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        bpd = self._finite_mean(loss, bpd)
        if bpd is None:
            return None
        self._clip_gradients()
        self.optimizer.step()
        self.scheduler.step()
        if self.average is not None:
            self.average.update(self.model, self.step)
        return bpd

    def _model_inputs(self, images: torch.Tensor, labels: torch.Tensor):
        """The batch in model space on the device, dequantised with this step's noise (and first
        augmented, with --augment, then perturbed, with --perturb); the labels when the model is
        class-conditional, else None."""
        run = self.run
        if run.augment:
            shifts, flips = augment_draws(images.shape, run.seed, self.step, self.dist.rank, self.dist.world_size)
            images = shift_and_flip(images, shifts, flips)
        if run.perturb > 0:  # background model of the likelihood-ratio score (Ren et al. 2019)
            generator = torch.Generator().manual_seed(perturb_seed(run.seed, self.step))
            images = perturb(images, run.perturb, generator)
        n_bits = self.model.config.n_bits
        x = preprocess(images.to(self.device, non_blocking=True), n_bits)
        x = x + step_noise(x.shape, n_bits, run.seed, self.step, self.dist.rank, self.dist.world_size, self.device)
        y = labels.to(self.device, non_blocking=True) if self.model.config.y_condition else None
        return x, y

    def _loss(self, x: torch.Tensor, y: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """The forward pass (under --amp's autocast) through self.step_model: the loss to minimise
        (bits/dim, plus --y_weight times the classification loss) and the mean bits/dim alone."""
        with autocast_context(self.device, self.run.amp):
            log_prob, y_logits = self.step_model(x, y)
        bpd = bits_per_dim(log_prob.float(), self.model.num_dims, self.model.config.n_bits).mean()
        loss = bpd
        if y_logits is not None:
            loss = loss + self.run.y_weight * classification_loss(y_logits.float(), y, self.model.config.y_multilabel)
        return loss, bpd

    def _finite_mean(self, loss: torch.Tensor, bpd: torch.Tensor) -> Optional[float]:
        """The step's bits/dim averaged over the processes, if the loss and every gradient are
        finite on every process; else None.

        A non-finite step is skipped: a finite loss can still overflow in the backward pass, and one
        such update would poison every weight. This is the step's one host-device synchronisation,
        placed after the backward pass is queued, so a GPU has the whole backward pass to run while
        the host waits; a skipped batch's gradients are dropped by the next step's zero_grad.
        """
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        finite = torch.isfinite(loss.detach()) & torch.isfinite(max_abs(grads))
        # (processes with a non-finite step, summed bits/dim): every process skips together, or none does
        summed = torch.stack([(~finite).double(), bpd.detach().double()])
        if self.dist.enabled:
            dist.all_reduce(summed)
        not_finite, bpd_sum = summed.tolist()
        return None if not_finite else bpd_sum / self.dist.world_size

    def _clip_gradients(self) -> None:
        """--max_grad_clip (per value), then --max_grad_norm (total 2-norm); 0 turns either off."""
        if self.run.max_grad_clip > 0:
            torch.nn.utils.clip_grad_value_(self.model.parameters(), self.run.max_grad_clip)
        if self.run.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.run.max_grad_norm)

    # -------------------------------------------------------------- checkpoints and samples

    @property
    def best_name(self) -> str:
        """File name of the checkpoint with the best validation bits/dim so far (without a
        validation split: the last epoch's)."""
        return f"Glow_{self.dataset_name}.pt"

    def save(self, name: str, **fields) -> Optional[str]:
        """Write checkpoint ``name`` into the output folder (main process only); its path, or None.
        Its ``model`` is the evaluation model's weights (averaged with --ema; the trained ones are
        then in ``raw_model``). ``fields`` replace those of :meth:`_checkpoint_fields`."""
        if not self.dist.is_main:
            return None
        fields = {**self._checkpoint_fields(), **fields}
        if self.average is not None:
            fields["raw_model"] = self.model.state_dict()
        return save_checkpoint(os.path.join(self.output_dir, name), self.eval_model, **fields)

    def _save_last(self, **fields) -> Optional[str]:
        """Write last.pt (the commit point of the run's state) and remember it as the last good one."""
        path = self.save("last.pt", **fields)
        if path is not None:
            self.last_good, self.saved_at = path, (self.epoch, self.step)
        return path

    def _checkpoint_fields(self) -> Dict:
        """Everything besides the model that resuming needs."""
        return dict(
            rng=rng_state(),
            run_config=self.run.to_dict(),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            epoch=self.epoch,
            step=self.step,
            best_val_bpd=self.best_val_bpd,
            test_bpd_at_best=self.test_at_best,
            nonfinite_steps=self.nonfinite_total,
            nonfinite_in_a_row=self.nonfinite_in_a_row,
            running_loss=self.loss.to_dict(),
        )

    def _last_good_exists(self) -> bool:
        return self.last_good is not None and os.path.isfile(self.last_good)

    def _diverged(self, what: str) -> NonFiniteLoss:
        """The error that stops a diverged run, naming the checkpoint it can go back to, if any."""
        if self._last_good_exists():
            folder, name = os.path.split(self.last_good)
            kept = f"the last good checkpoint is kept in {folder or '.'} ({name})"
        else:
            kept = f"no checkpoint was written to {self.output_dir}"
        return NonFiniteLoss(
            f"{what}: training diverged; {kept} (try a lower --lr, --max_grad_norm or --flow_coupling additive)"
        )

    def save_samples(self, epoch: int) -> str:
        """An 8x8 grid of samples at temperature 0.7 (one class per position for a class-conditional
        model) after ``epoch`` epochs, written as samples_epoch<NNN>.png; its path."""
        torch.manual_seed(run_seed_for_samples(self.run.seed, epoch))
        model = self.eval_model
        y = None
        if model.config.y_condition and not model.config.y_multilabel:
            y = torch.arange(64, device=self.device) % model.config.num_classes
        was_training = model.training
        model.eval()
        x, report = model.sample_with_report(64, temperature=0.7, y=y)  # failed samples redrawn, counted
        model.train(was_training)
        path = os.path.join(self.output_dir, f"samples_epoch{epoch:03d}.png")
        save_grid(x, self.model.config.n_bits, path, nrow=8)
        print(f"saved {path} ({report.describe()})")
        return path


# ----------------------------------------------------------------------------- stopping


class StopSignals:
    """SIGINT and SIGTERM during :meth:`Trainer.fit`: both raise KeyboardInterrupt (so SIGTERM, what
    Slurm sends before it kills a job, saves last.pt as Ctrl-C does), but not inside a
    :meth:`held` block, where the training state is being changed: there the signal is remembered
    and raised when the block ends. A second signal inside the block raises at once, and
    :attr:`broke_in` says so (the state may then be half changed).

    Installed only in the main thread (where Python delivers signals), and not for a signal the
    process ignores (``nohup``); :meth:`restore` puts the previous handlers back.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.previous: Dict[int, object] = {}
        self.holding: Optional[str] = None  # None: not held; else the note printed when a signal is held
        self.pending: Optional[int] = None
        self.broke_in = False

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.SIGNALS:
            if signal.getsignal(signum) is not signal.SIG_IGN:
                self.previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.holding is not None and self.pending is None:
            self.pending = signum
            if self.holding:
                print(f"\nnote: {self.holding} (interrupt again to stop at once)", file=sys.stderr)
            return
        if self.holding is not None:
            self.broke_in = True
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def held(self, note: str = "") -> Iterator[None]:
        """A block that a stop signal does not interrupt; KeyboardInterrupt when it ends if one came."""
        self.holding = note
        try:
            yield
        finally:
            self.holding = None
        if self.pending is not None:
            self.pending = None
            raise KeyboardInterrupt


# ----------------------------------------------------------------------------- resuming


# What a resumed run may change; everything else (data, seed, optimisation, n_bits) is the stored run's.
RESUME_OVERRIDES = (
    "n_epochs",
    "max_steps",
    "output_dir",
    "device",
    "num_workers",
    "no_wandb",
    "tensorboard",
    "resume",
    "overwrite",
    "data_root",
    "sample_and_save_freq",
    "max_eval_images",
    "compile",
    "amp",
    "grad_checkpoint",
)
# What a checkpoint written before a field existed means by its absence (not the new default).
LEGACY_RUN_FIELDS = {"val_size": 0}  # no validation split: such runs trained on the whole training split


def resumed_config(stored: Dict, current: RunConfig) -> RunConfig:
    """The stored run configuration, with the fields of RESUME_OVERRIDES taken from ``current``.

    The run writes into ``current``'s --output_dir, or else next to the resumed checkpoint; never
    into a folder named by the checkpoint itself (a file from elsewhere must not choose where
    this run writes).
    """
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in stored.items() if k in fields}
    values.update({k: v for k, v in LEGACY_RUN_FIELDS.items() if k not in stored})
    values.update({k: getattr(current, k) for k in RESUME_OVERRIDES})
    if current.output_dir is None:
        values["output_dir"] = os.path.dirname(current.resume) or os.curdir
    return RunConfig(**values)


# ----------------------------------------------------------------------------- seeds of the random streams
# Each is ``seed * SEED_STRIDE + offset`` (glowflow.config); the epoch order's is in glowflow.data.


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


# ----------------------------------------------------------------------------- pieces of a step


def rng_state() -> Dict:
    """The global random states a checkpoint stores (torch's, and CUDA's where there is CUDA)."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


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


def max_abs(tensors: List[torch.Tensor]) -> torch.Tensor:
    """max |t| over a list of tensors, as a 0-d tensor on their device (NaN if any is NaN; 0 for
    an empty list). Never overflows, unlike the 2-norm, so it is inf only for an infinite entry."""
    if not tensors:
        return torch.zeros(())
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6: fused, one kernel per device
        return torch.nn.utils.get_total_norm(tensors, norm_type=math.inf)
    return torch.stack([t.detach().abs().max() for t in tensors]).max()


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


def check_labels(dataset, config: GlowConfig, split: str) -> None:
    """GlowflowError (one line) unless every label of ``dataset`` fits a class-conditional model of
    ``config``: class indices below num_classes, or multi-hot rows num_classes wide. Nothing to
    check for a model without --y_condition, which never sees the labels."""
    if not config.y_condition:
        return
    info = dataset.info
    labels = getattr(dataset, "labels", None)
    if isinstance(labels, torch.Tensor) and labels.numel():
        multilabel = labels.dim() == 2
        width = labels.shape[1] if multilabel else None
        largest = None if multilabel else int(labels.max())
    else:  # read from files (or a subset of them): class indices below the dataset's number of classes
        multilabel, width, largest = info.multilabel, info.num_classes, info.num_classes - 1
    n = config.num_classes
    what = f"the {split} labels of {info.name}"
    if config.y_multilabel and not multilabel:
        raise GlowflowError(f"{what} are class indices, but the model takes multi-hot rows of {n} classes")
    if config.y_multilabel and width != n:
        raise GlowflowError(f"{what} are multi-hot rows of {width} classes, but the model has num_classes {n}")
    if not config.y_multilabel and multilabel:
        raise GlowflowError(f"{what} are multi-hot rows of {width} classes, but the model takes one class per image")
    if not config.y_multilabel and largest >= n:
        raise GlowflowError(
            f"{what} go up to {largest}, but the model has num_classes {n} (labels 0 to {n - 1}); "
            f"pass --num_classes {largest + 1} or more"
        )


def _stack_labels(labels) -> torch.Tensor:
    return torch.stack([torch.as_tensor(label) for label in labels])


# ----------------------------------------------------------------------------- evaluation

SPLIT_WORDS = {"val": "validation", "raw_val": "validation (raw weights, without EMA)", "test": "test"}


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
    generator = torch.Generator().manual_seed(seed)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    seen = 0
    show = dist_ctx is None or dist_ctx.is_main
    for images, labels in progress_bar(loader, desc=desc, unit="batch", leave=False, disable=not show):
        if max_images is not None and seen >= max_images:
            break
        x = preprocess(images, n_bits)
        x = (x + dequantization_noise(x.shape, n_bits, generator)).to(device, non_blocking=True)
        y = labels.to(device) if use_labels else None
        bpd = bits_per_dim(model.log_prob(x, y), model.num_dims, n_bits)
        total[0] += bpd.double().sum()
        total[1] += bpd.shape[0]
        seen += bpd.shape[0]
    if dist_ctx is not None:
        dist_ctx.all_sum(total)
    model.train(was_training)
    return (total[0] / total[1].clamp_min(1)).item()
