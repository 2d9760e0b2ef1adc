"""The training run: :func:`train` (the ``--train`` command) and the :class:`Trainer` whose methods
are its loop (epochs, steps, evaluation, the end-of-epoch writes) and its checkpoints.

The pieces the loop calls live beside it, one concern each: the data (:mod:`.splits`), resuming
(:mod:`.resuming`), seeds and per-step noise (:mod:`.seeding`), one optimizer step (:mod:`.step`),
ActNorm's initialisation (:mod:`.actnorm_init`), Polyak averaging (:mod:`.averaging`), going back
from a bad step (:mod:`.rollback`), bits/dim of a split (:mod:`.evaluation`), stop signals
(:mod:`.signals`) and what a run prints and records (:mod:`.report`).
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from glowflow.checkpoint import Checkpoint, save_checkpoint
from glowflow.config import GlowConfig, RunConfig, dataset_slug
from glowflow.curves import RunningLoss, curve_interval
from glowflow.model import Glow
from glowflow.pixels import save_grid
from glowflow.progress import progress_bar
from glowflow.runfolder import RunFolder
from glowflow.runtime import Distributed, compile_model, resolve_device
from glowflow.tracking import Tracker
from glowflow.training import report
from glowflow.training import step as step_parts
from glowflow.training.actnorm_init import initialize_actnorm
from glowflow.training.averaging import WeightAverage
from glowflow.training.evaluation import SPLIT_WORDS, evaluate_bpd
from glowflow.training.prior_fitting import PriorFitting
from glowflow.training.resuming import restore_run
from glowflow.training.rollback import Rollback, read_stored
from glowflow.training.seeding import rng_state, run_seed_for_samples, set_rng_state
from glowflow.training.signals import StopSignals
from glowflow.training.splits import build_loaders, build_sampler, load_splits
from glowflow.training.step import NonFiniteLoss


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

    # -------------------------------------------------------------- assembling a run

    def __init__(self, run: RunConfig, model_config: Optional[GlowConfig] = None):
        run.validate()
        self.device = resolve_device(run.device)
        self.dist = Distributed(self.device)
        self.run, model_config, resumed = restore_run(run, model_config)
        self.stored_rollback = read_stored(resumed, self.run.max_rollbacks, self.run.ema > 0)  # checked now
        self.output_dir = self.run.resolved_output_dir()
        self.folder = RunFolder(self.output_dir)
        self.folder.check_unused(resuming=resumed is not None, overwrite=self.run.overwrite)  # before any work
        self.dataset_name = dataset_slug(self.run.dataset)
        self.run, self.train_set, self.val_set, self.test_set = load_splits(self.run, model_config, self.dataset_name)
        torch.manual_seed(self.run.seed)  # a fresh model's initial weights follow from --seed
        self.model = (Glow.from_config(model_config) if resumed is None else resumed.build_model()).to(self.device)
        self.model.grad_checkpoint = self.run.grad_checkpoint
        self.sampler = build_sampler(len(self.train_set), self.run, self.dist)
        self.steps_per_epoch = self.sampler.batches_per_epoch
        self.cost = self._estimate_cost(resumed)  # refused here if it cannot fit in memory
        if self.dist.is_main:  # after data and model are found good, so a bad input leaves no empty folder
            self.folder.claim(overwrite=self.run.overwrite)
        try:
            self._start(resumed)
        except BaseException as err:
            self.close(failed=isinstance(err, (Exception, KeyboardInterrupt)))
            raise
        self.tracker: Optional[Tracker] = None  # opened by fit(), on the main process only
        self.signals = StopSignals()

    def _estimate_cost(self, resumed: Optional[Checkpoint]):
        """What the run will cost (glowflow.cost.RunCost); refused when it cannot fit in memory."""
        start = resumed.step if resumed is not None else 0
        initialise = resumed is None and not self.model.is_initialized()
        n_train, batch = len(self.train_set), self.sampler.global_batch
        return report.estimate_cost(
            self.model, self.run, n_train, self.steps_per_epoch, batch, start, initialise, self.device, self.dist
        )

    def _start(self, resumed: Optional[Checkpoint]) -> None:
        """Once the output folder is claimed: the header, the optimizer, the counters (the
        checkpoint's when resuming; else ActNorm is initialised), the weight average, the wrapped
        model and the loaders."""
        if self.dist.is_main:
            where = f"device {self.device}, {self.dist.world_size} process(es), output {self.output_dir}"
            splits = (self.train_set, self.val_set, self.test_set)
            report.print_header(self.dataset_name, splits, self.run.val_size, self.model, where, self.cost)
        self.optimizer, self.scheduler = step_parts.build_optimizer(self.model, self.run, self.steps_per_epoch)
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
        self.rollback = Rollback(self.run.max_rollbacks, self.model, self.average, self.optimizer, self.scheduler)
        self.rollback.start(self.stored_rollback, self.step, self.epoch)  # keeps the state the run starts from
        self.skipped_for: Optional[str] = None  # what was not finite in the last skipped step
        self.step_model = self._wrap_for_training()  # DDP- and/or compile-wrapped self.model, or self.model itself
        splits = (self.train_set, self.val_set, self.test_set)
        self.train_loader, self.val_loader, self.test_loader = build_loaders(
            splits, self.sampler, self.run, self.dist, self.device
        )
        self.prior_fitting = PriorFitting(self.train_set, self.model, self.run, self.device, self.dist.is_main)

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
        set_rng_state(resumed.rng_state)

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

    def close(self, failed: bool = False) -> None:
        """Release the output folder (``failed``: removing what the run wrote if it wrote no
        checkpoint) and leave the process group (both safe to repeat)."""
        self.folder.release(failed)
        self.dist.close()

    @property
    def eval_model(self) -> Glow:
        """The weights evaluation, sampling and the checkpoints' ``model`` use: the Polyak average
        with --ema, else the trained weights themselves."""
        return self.average.model if self.average is not None else self.model

    # -------------------------------------------------------------- the loop

    def fit(self) -> Dict:
        """Train epoch by epoch until --n_epochs or --max_steps; SIGINT (Ctrl-C) and SIGTERM save
        last.pt first."""
        if self.dist.is_main:
            self.tracker = report.make_tracker(
                self.run, self.model, self.output_dir, self.dataset_name, self.epoch, self.step, self.steps_per_epoch
            )
        stopped_early = False
        self.signals.install()
        try:
            while self.epoch < self.run.n_epochs and not stopped_early:
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
            "rollbacks": self.rollback.count,
            "output_dir": self.output_dir,
        }
        self.dist.barrier()
        return summary

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
            if self.rollback.enabled and not step_parts.weights_finite(self.model, self.dist):
                self._roll_back("weights")  # the last update's, which no step has checked yet
            fitted = [self.model] + ([self.average.model] if self.average is not None else [])
            earlier_fits = self.prior_fitting.refit(fitted)  # glowflow/training/prior_fitting.py
            scores = self.evaluate()  # collective under torchrun: every process evaluates
            for split, value in scores.items():
                if value is not None and not math.isfinite(value):
                    raise self._diverged(f"the {SPLIT_WORDS[split]} bits/dim after step {self.step} is {value}")
            if epoch > self.epoch:
                self.rollback.keep(self.step, epoch)  # the state the evaluation found finite
            val_bpd, test_bpd = scores["val"], scores["test"]
            improved = val_bpd is None or val_bpd < self.best_val_bpd  # no validation split: the last epoch
            best_val_bpd = (val_bpd if val_bpd is not None else math.inf) if improved else self.best_val_bpd
            test_at_best = test_bpd if improved else self.test_at_best
            row = report.metrics_row(epoch, self.step, self.loss, scores, self.learning_rate())
            carried = RunningLoss() if epoch > self.epoch else self.loss  # what resuming from here continues
            if self.dist.is_main:
                rng = rng_state()  # last.pt's, as it was before the sample grid reseeded torch
                if improved:
                    fields = dict(best_val_bpd=best_val_bpd, test_bpd_at_best=test_at_best)
                    self.save(self.best_name, epoch=epoch, running_loss=carried.to_dict(), **fields)
                self._record_epoch(epoch, row, improved)
            if epoch == self.epoch:  # stopped between epoch ends: train on as an uninterrupted run would
                self.prior_fitting.put_back(fitted, earlier_fits)
            self.epoch, self.best_val_bpd, self.test_at_best = epoch, best_val_bpd, test_at_best
            self.loss = carried
            if self.dist.is_main:
                self._save_last(rng=rng)
        return stopped_early

    def _record_epoch(self, epoch: int, row: Dict, improved: bool) -> None:
        """The epoch's metrics row, its line, and every sample_and_save_freq epochs its sample grid
        (main process; ``epoch``: the epochs completed, self.epoch still the epoch before)."""
        self.tracker.log_epoch(row)
        report.print_epoch(row, self.run.n_epochs, improved, self.nonfinite_total, self.rollback.count)
        freq = self.run.sample_and_save_freq
        if epoch > self.epoch and freq > 0 and epoch % freq == 0:
            path = self.save_samples(epoch)
            self.tracker.log_image(self.step, "samples", path)

    def _run_steps(self) -> bool:
        """train_step over the current epoch's remaining batches (all of them unless resumed mid-epoch),
        with a progress bar and the step curve's points; True if it stopped at --max_steps. A skipped
        step is rolled back (--max_rollbacks above 0); NonFiniteLoss after --max_nonfinite_steps
        skipped steps in a row (counted across epochs) or a bad step with no rollback left."""
        run = self.run
        self.sampler.set_epoch(self.epoch, start_batch=self.step - self.epoch * self.steps_per_epoch)
        self.model.train()
        desc, show = f"epoch {self.epoch + 1}/{run.n_epochs}", self.dist.is_main
        bar = progress_bar(self.train_loader, total=len(self.train_loader), desc=desc, unit="step", disable=not show)
        stopped_early, clock = False, time.perf_counter()
        for images, labels in bar:
            with self.signals.held():  # a stop signal waits for the step to be applied (or undone), counted and logged
                bpd = self.train_step(images, labels)
                self._count_step(bpd, images.shape[0] * self.dist.world_size, time.perf_counter() - clock)
                if bpd is None:
                    if self.nonfinite_in_a_row >= run.max_nonfinite_steps:
                        bar.close()
                        raise self._diverged(
                            f"{self.nonfinite_in_a_row} non-finite losses or gradients in a row at step {self.step}"
                        )
                    if self.rollback.enabled:
                        self._roll_back(self.skipped_for, bar)
                clock = time.perf_counter()
            if bpd is None:
                continue
            images_per_s = self.loss.epoch_images / max(self.loss.epoch_seconds, 1e-9)
            bar.set_postfix(refresh=False, bpd=f"{self.loss.epoch_mean():.3f}", img_s=f"{images_per_s:.0f}")
            if run.max_steps is not None and self.step >= run.max_steps:
                stopped_early = True
                break
        bar.close()
        return stopped_early

    def _count_step(self, bpd: Optional[float], n_images: int, seconds: float) -> None:
        """Count the step just taken (``bpd`` None: skipped), its images and ``seconds``, and log
        the step curve's point it may end."""
        self.step += 1  # batches consumed: a skipped batch counts, so data order and noise stay aligned
        if bpd is None:
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
        else:
            self.nonfinite_in_a_row = 0
            self.loss.add(bpd, n_images)
        self.loss.epoch_seconds += seconds
        self._log_curve_point()

    def _log_curve_point(self) -> None:
        """A row of steps.csv (main process) when this step ends a point of the curve: every
        curve_interval steps of an epoch, and its last step."""
        into_epoch = self.step - self.epoch * self.steps_per_epoch
        if into_epoch % curve_interval(self.steps_per_epoch) and into_epoch < self.steps_per_epoch:
            return
        mean = self.loss.take_point()
        if mean is not None and self.tracker is not None:
            self.tracker.log_step(self.step, self.step / self.steps_per_epoch, mean)

    def _roll_back(self, what: str, bar=None) -> None:
        """After the bad step ``self.step`` (``what`` was not finite): put the kept state back and
        lower the learning rate for a while, with a line and a metrics.csv row; NonFiniteLoss when
        no rollback is left."""
        rollback = self.rollback
        if what != "weights" and not step_parts.weights_finite(self.model, self.dist):
            what = "weights"  # what made the loss or gradients non-finite
        if not rollback.left:
            raise self._diverged(
                f"non-finite {what} at step {self.step} after {rollback.count} rollback(s) "
                f"(--max_rollbacks {rollback.max_rollbacks})"
            )
        restored = rollback.roll_back(self.step)
        if self.dist.is_main:
            event = report.rollback_event(self.step, what, restored, rollback)
            report.print_note(f"note: {event}", bar)
            self.tracker.log_event(report.event_row(self.epoch, self.step, self.learning_rate()), event)

    def learning_rate(self) -> float:
        """The learning rate of the next step: the schedule's, lowered during a rollback's cool-down."""
        return self.optimizer.param_groups[0]["lr"] * self.rollback.lr_scale(self.step)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> Optional[float]:
        """One optimizer step on a batch of raw images: its mean bits/dim (over every process's
        share), or None when the step was skipped for a non-finite loss or gradient (or weights,
        checked when the rollback guard keeps the state; :attr:`skipped_for` says which). Counting
        the step and rolling it back are the caller's job."""
        x, y = step_parts.model_inputs(images, labels, self.model, self.run, self.step, self.dist, self.device)
        loss, bpd = step_parts.step_loss(self.step_model, self.model, x, y, self.run, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        keep = self.rollback.keep_due(self.step)  # then the check covers the weights too
        bpd, self.skipped_for = step_parts.check_step(self.model, loss, bpd, self.dist, weights=keep)
        if bpd is None:
            return None
        if keep:
            self.rollback.keep(self.step, self.epoch)  # the state this step starts from, found finite
        step_parts.clip_gradients(self.model, self.run)
        self.rollback.scale_learning_rate(self.step)
        self.optimizer.step()
        self.scheduler.step()
        self.rollback.updated()
        if self.average is not None:
            self.average.update(self.model, self.step)
        return bpd

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
            rollback=self.rollback.to_checkpoint(),
        )

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
        x, drawn = model.sample_with_report(64, temperature=0.7, y=y)  # failed samples redrawn, counted
        model.train(was_training)
        path = os.path.join(self.output_dir, f"samples_epoch{epoch:03d}.png")
        save_grid(x, self.model.config.n_bits, path, nrow=8)
        print(f"saved {path} ({drawn.describe()})")
        return path
