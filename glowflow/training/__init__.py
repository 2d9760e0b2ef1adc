"""Training (the ``--train`` command): one process or many (torchrun + DistributedDataParallel), CPU or GPU.

One module per concern:

* :mod:`.trainer` -- :func:`train` (the ``--train`` command) and the :class:`Trainer`: its loop,
  evaluation each epoch, checkpoints and sample grids;
* :mod:`.splits` -- the training, validation and test splits, checked against the model
  (:func:`check_labels`), and their loaders;
* :mod:`.resuming` -- what a resumed run keeps from its checkpoint (:data:`RESUME_OVERRIDES`);
* :mod:`.seeding` -- the seeds of every random stream, the per-step dequantisation noise and
  augmentation draws, the random states a checkpoint stores;
* :mod:`.step` -- one optimizer step: inputs, loss, the finite check (:class:`NonFiniteLoss`),
  clipping, the optimizer and its warm-up;
* :mod:`.actnorm_init` -- ActNorm's data-dependent initialisation;
* :mod:`.averaging` -- Polyak averaging of the weights (:class:`WeightAverage`, ``--ema``);
* :mod:`.rollback` -- going back from a bad step (:class:`Rollback`, ``--max_rollbacks``);
* :mod:`.evaluation` -- bits/dim of an evaluation split (:func:`evaluate_bpd`);
* :mod:`.signals` -- stopping on SIGINT / SIGTERM (:class:`StopSignals`);
* :mod:`.report` -- the cost, the header, each epoch's line and metrics row, the tracker.

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
* divergence -- a non-finite step is skipped and, with ``--max_rollbacks`` above 0, rolled back to
  the last finite state kept in memory, at a lowered learning rate for a while (:mod:`.rollback`);
  a bad step after ``--max_rollbacks`` rollbacks, ``--max_nonfinite_steps`` skipped steps in a row
  (counted across epochs and resumes) or a non-finite test bits/dim stop the run
  (:class:`NonFiniteLoss`) before a diverged model overwrites a checkpoint;
* :func:`check_labels` -- class labels that a class-conditional model cannot take are refused when
  the data is loaded.
"""

from glowflow.runfolder import LOCK_NAME, RunFolder, RunLock
from glowflow.training.actnorm_init import actnorm_images, initialize_actnorm
from glowflow.training.averaging import WeightAverage
from glowflow.training.evaluation import SPLIT_WORDS, evaluate_bpd
from glowflow.training.resuming import LEGACY_RUN_FIELDS, RESUME_OVERRIDES, restore_run, resumed_config
from glowflow.training.rollback import Rollback
from glowflow.training.seeding import (
    actnorm_seed,
    augment_draws,
    augment_seed,
    noise_seed,
    perturb_seed,
    rng_state,
    run_seed_for_samples,
    set_rng_state,
    step_noise,
)
from glowflow.training.signals import StopSignals
from glowflow.training.splits import check_labels, load_splits
from glowflow.training.step import NonFiniteLoss, max_abs
from glowflow.training.trainer import Trainer, train

__all__ = [
    "LEGACY_RUN_FIELDS",
    "LOCK_NAME",
    "RESUME_OVERRIDES",
    "SPLIT_WORDS",
    "NonFiniteLoss",
    "RunFolder",
    "Rollback",
    "RunLock",
    "StopSignals",
    "Trainer",
    "WeightAverage",
    "actnorm_images",
    "actnorm_seed",
    "augment_draws",
    "augment_seed",
    "check_labels",
    "evaluate_bpd",
    "initialize_actnorm",
    "load_splits",
    "max_abs",
    "noise_seed",
    "perturb_seed",
    "restore_run",
    "resumed_config",
    "rng_state",
    "run_seed_for_samples",
    "set_rng_state",
    "step_noise",
    "train",
]
