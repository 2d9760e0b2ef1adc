"""What a resumed run keeps from its checkpoint: the stored run configuration less the fields a
resumed run may change (:data:`RESUME_OVERRIDES`), and the architecture; :func:`restore_run`
reads and checks the checkpoint ``--resume`` names."""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, Optional, Tuple

from glowflow.checkpoint import Checkpoint
from glowflow.config import GlowConfig, RunConfig
from glowflow.errors import GlowflowError

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
LEGACY_RUN_FIELDS = {
    "val_size": 0,  # no validation split: such runs trained on the whole training split
    "max_rollbacks": 0,  # such runs skipped non-finite steps without going back
}


def restore_run(
    run: RunConfig, model_config: Optional[GlowConfig]
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
