"""The checkpoint file's schema, in code: :class:`CheckpointContents` names every key a checkpoint
may hold, with its type. The trainer's save builds one (through
:func:`glowflow.checkpoint.save_checkpoint`, so a key it does not declare is a TypeError) and the
reader (glowflow/reader.py) checks the training state field by field from the same declaration.

A checkpoint is one ``torch.save`` file of a dict holding only tensors and plain Python values
(dicts, lists, strings, numbers), so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch

FORMAT = "glowflow-checkpoint"
VERSION = 2
"""Version 1 files (before ``n_bits`` joined the model configuration) keep it in ``run_config``."""
MAX_COUNTER = 2**62
"""Largest epoch or step count a checkpoint may hold."""

COUNTER, BPD = "counter", "bits/dim"
"""Kinds of training-state number: a count from 0 to MAX_COUNTER; a bits/dim (a number, inf when none)."""


def _counter(default: Optional[int] = None, doc: str = "") -> Any:
    return field(default=None, metadata={"kind": COUNTER, "default": default, "doc": doc})


def _bpd(doc: str) -> Any:
    return field(default=None, metadata={"kind": BPD, "doc": doc})


@dataclass
class CheckpointContents:
    """What a checkpoint holds besides ``format`` ("glowflow-checkpoint") and ``version``. Only
    ``model_config`` and ``model`` are always there; a field left None is not written. A file may
    hold keys of older versions that are read and ignored (``dataset_info``)."""

    model_config: Dict[str, Any]
    """:class:`glowflow.config.GlowConfig` as a dict: architecture, image shape and ``n_bits``."""
    model: Dict[str, torch.Tensor]
    """The state dict to evaluate and sample with (Polyak-averaged when the run had ``--ema``)."""
    raw_model: Optional[Dict[str, torch.Tensor]] = None
    """With ``--ema`` only: the trained weights themselves, which a resumed run continues from."""
    run_config: Optional[Dict[str, Any]] = None
    """:class:`glowflow.config.RunConfig` as a dict, with the validation split's ``val_size`` and ``seed``."""
    optimizer: Optional[Dict[str, Any]] = None
    """The optimizer's state dict (Adamax)."""
    scheduler: Optional[Dict[str, Any]] = None
    """The learning-rate scheduler's state dict (LambdaLR)."""
    epoch: Optional[int] = _counter(doc="completed epochs")
    step: Optional[int] = _counter(doc="optimizer steps")
    best_val_bpd: Optional[float] = _bpd("the validation bits/dim that chose the best checkpoint (inf without one)")
    test_bpd_at_best: Optional[float] = _bpd("the chosen checkpoint's test bits/dim, reported only")
    best_test_bpd: Optional[float] = _bpd("files written before the validation split: the test bits/dim that chose it")
    nonfinite_steps: Optional[int] = _counter(0, "steps skipped for a non-finite loss or gradient")
    nonfinite_in_a_row: Optional[int] = _counter(0, "the divergence guard's count of steps skipped in a row")
    running_loss: Optional[Dict[str, Any]] = None
    """The epoch's running sums so far (glowflow/curves.py's ``RunningLoss``)."""
    rng: Optional[Dict[str, Any]] = None
    """The random number generators' states: ``torch`` (CPU) and ``cuda`` (a list, one per GPU)."""
    rollback: Optional[Dict[str, Any]] = None
    """With ``--max_rollbacks`` above 0: the rollback guard's counters, and the state it would go back
    to when that is not this checkpoint's own (a checkpoint payload; glowflow/training/rollback.py)."""

    def payload(self) -> Dict[str, Any]:
        """The dict ``torch.save`` writes: ``format``, ``version``, then every field that is set."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"format": FORMAT, "version": VERSION, **{k: v for k, v in values.items() if v is not None}}


def training_numbers(kind: str) -> Tuple[Tuple[str, Optional[int]], ...]:
    """(key, default when absent) of every field of ``kind`` (:data:`COUNTER` or :data:`BPD`)."""
    return tuple(
        (f.name, f.metadata.get("default"))
        for f in dataclasses.fields(CheckpointContents)
        if f.metadata.get("kind") == kind
    )
