"""The ``glowflow --train`` command that reproduces a stored run (:func:`training_command`), for
model cards and provenance."""

from __future__ import annotations

import dataclasses
import shlex
from typing import Any, Dict

from glowflow.config.architecture import GlowConfig
from glowflow.config.run import RunConfig

TRAINING_COMMAND_FIELDS = (
    "dataset",
    "image_size",
    "n_epochs",
    "max_steps",
    "batch_size",
    "lr",
    "warmup",
    "decay",
    "max_grad_clip",
    "max_grad_norm",
    "y_weight",
    "num_classes",
    "seed",
    "val_size",
    "ema",
    "augment",
    "perturb",
    "amp",
)
"""The run flags that decide what a training run learns (not where it reads or writes, or how
fast), in the order :func:`training_command` writes them."""


def training_command(run_values: Dict[str, Any], model: GlowConfig) -> str:
    """The ``glowflow --train`` command that trains ``model`` as the stored run configuration
    ``run_values`` (a checkpoint's ``run_config``) records: the flags of TRAINING_COMMAND_FIELDS and
    the architecture flags that differ from their defaults (``--dataset`` always)."""
    run_defaults, arch_defaults = RunConfig(), GlowConfig()
    words = ["glowflow", "--train"]

    def add(name: str, value: Any, default: Any) -> None:
        if value == default and name != "dataset":
            return
        if isinstance(value, bool):
            words.extend([f"--{name}"] if value else [])
        elif value is not None:
            values = value if isinstance(value, (list, tuple)) else [value]
            words.extend([f"--{name}", *(shlex.quote(str(v)) for v in values)])

    for name in TRAINING_COMMAND_FIELDS:
        if name in run_values:
            add(name, run_values[name], getattr(run_defaults, name))
    for field in dataclasses.fields(GlowConfig):
        if field.name not in ("image_shape", "num_classes", "y_multilabel"):  # these follow the dataset
            add(field.name, getattr(model, field.name), getattr(arch_defaults, field.name))
    return " ".join(words)
