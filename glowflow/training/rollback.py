"""Going back from a bad step (``--max_rollbacks``): :class:`Rollback` keeps in memory a copy of the
last training state known to be finite and puts it back when a step's loss, gradients or weights
are not.

What it keeps: the trained weights and buffers, the optimizer's state (Adamax), the learning-rate
scheduler's and, with ``--ema``, the Polyak average: three to four copies of the weights, small next
to a step's activations. It keeps them when the run starts (or resumes), at the end of every
completed epoch (the state that epoch's evaluation found finite, its weights checked first) and
every :data:`KEEP_EVERY` steps (at the start of a step whose loss, gradients and starting weights
were all found finite, before its update; counted from the kept state or the last rollback,
whichever is later), and never twice without an update in between. So a kept state is always one
whose weights were checked. Between those checks a non-finite weight (which Adamax cannot make from
finite gradients: its update is bounded by the learning rate) would make the next step's loss
non-finite; a bad step checks the weights once more to say which it was.

A rollback puts that state back, skips the batch (the step counter still moves on, so data order
and noise stay aligned) and multiplies the scheduled learning rate by :data:`LR_FACTOR` for the
:data:`COOLDOWN_STEPS` steps after it, then the schedule is back in force; a rollback during a
cool-down multiplies the factor again and starts the cool-down anew. After ``--max_rollbacks``
rollbacks the next bad step stops the run (glowflow/training/trainer.py says so, naming the last
good checkpoint). ``--max_rollbacks 0``: nothing is kept, checked or changed.

Resuming is exact: the checkpoint's ``rollback`` field holds the counters, the cool-down and the
kept state's step, and the kept state itself when it is not the checkpoint's own (a checkpoint
written part-way through an epoch), read back through the checks every checkpoint goes through
(:meth:`glowflow.checkpoint.Checkpoint.from_payload`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from glowflow.checkpoint import Checkpoint
from glowflow.checkpoint_schema import MAX_COUNTER, CheckpointContents
from glowflow.config import is_int
from glowflow.errors import GlowflowError
from glowflow.model import Glow
from glowflow.training.averaging import WeightAverage

KEEP_EVERY = 50
"""Steps between two copies of the state. A copy costs a few percent of a step (on CPU: 0.5 ms
against 9-13 ms for the tests' tiny model, 8 ms against 150-220 ms for the default 1x32x32
architecture at batch 32), so every 50 steps it is lost in the noise (under 0.1%); and a rollback
goes back at most 50 steps, a tenth of an MNIST epoch at batch 128 (469 steps), far enough to
leave the stretch where a run began to diverge."""
COOLDOWN_STEPS = 100
"""Steps after a rollback at the lowered learning rate: twice KEEP_EVERY, so the run passes the
point where it failed again at the lower rate."""
LR_FACTOR = 0.5
"""What a rollback multiplies the learning rate by, during its cool-down."""
_COUNTERS = ("rollbacks", "lr_cuts", "cooldown_until", "kept_step")


@dataclass
class KeptState:
    """A copy of the training state after ``step`` steps (``epoch`` epochs completed): the trained
    weights and buffers (``model``), the Polyak average's (``average``, with --ema), and the
    optimizer's and the scheduler's state dicts."""

    step: int
    epoch: int
    model: Dict[str, torch.Tensor]
    average: Optional[Dict[str, torch.Tensor]]
    optimizer: Dict[str, Any]
    scheduler: Dict[str, Any]


class Rollback:
    """The rollback guard of one run: the kept state, and the counters a checkpoint stores.

    ``count``: rollbacks so far (the whole run, resumes included); ``lr_cuts``: how many times
    LR_FACTOR multiplies the learning rate during the cool-down; ``cooldown_until``: the steps
    before this one (counted from 0) are in the cool-down. The trainer asks :meth:`keep_due` before
    a step's finite check (which then checks the weights too) and calls :meth:`keep` after it passes,
    :meth:`scale_learning_rate` before the optimizer's step and :meth:`updated` after it,
    :meth:`roll_back` after a bad step, and :meth:`keep` at the end of each epoch."""

    def __init__(self, max_rollbacks: int, model: Glow, average: Optional[WeightAverage], optimizer, scheduler):
        self.max_rollbacks = max_rollbacks
        self.model, self.average, self.optimizer, self.scheduler = model, average, optimizer, scheduler
        self.count = 0
        self.lr_cuts = 0
        self.cooldown_until = 0
        self.kept: Optional[KeptState] = None
        self.moved = True  # whether the state has changed since it was kept

    @property
    def enabled(self) -> bool:
        return self.max_rollbacks > 0

    @property
    def left(self) -> int:
        """Rollbacks still allowed."""
        return max(self.max_rollbacks - self.count, 0)

    # -------------------------------------------------------------- the learning rate

    def lr_scale(self, step: int) -> float:
        """What multiplies the scheduled learning rate of the step after ``step`` steps."""
        return LR_FACTOR**self.lr_cuts if step < self.cooldown_until else 1.0

    def scale_learning_rate(self, step: int) -> None:
        """Before the optimizer's step after ``step`` steps: the scheduled learning rate, times the
        cool-down's factor (the scheduler's next step sets the schedule's own again)."""
        scale = self.lr_scale(step)
        if scale != 1.0:
            for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
                group["lr"] = lr * scale

    # -------------------------------------------------------------- keeping and putting back

    def keep(self, step: int, epoch: int) -> None:
        """Copy the state after ``step`` steps, unless nothing has changed since the last copy."""
        if not self.enabled or not self.moved:
            return
        average = self.average.model.state_dict() if self.average is not None else None
        self.kept = KeptState(
            step,
            epoch,
            _copy(self.model.state_dict()),
            _copy(average),
            _copy(self.optimizer.state_dict()),
            _copy(self.scheduler.state_dict()),
        )
        self.moved = False

    def keep_due(self, step: int) -> bool:
        """Whether the state after ``step`` steps is to be kept (if the step's check finds it finite):
        KEEP_EVERY steps have passed since the kept state and since the last rollback, and it has
        changed since."""
        if not self.enabled or not self.moved:
            return False
        since = max(self.kept.step, self.cooldown_until - COOLDOWN_STEPS) if self.kept is not None else -KEEP_EVERY
        return step - since >= KEEP_EVERY

    def updated(self) -> None:
        """After an optimizer step: the state is no longer the kept one."""
        self.moved = True

    def roll_back(self, step: int) -> int:
        """Put the kept state back after the bad step ``step`` (counted from 1), and start (or,
        during a cool-down, deepen and restart) the cool-down; the kept state's step."""
        kept = self.kept
        self.model.load_state_dict(kept.model)
        if self.average is not None:
            self.average.model.load_state_dict(kept.average)
        # loading keeps the given tensors, which later steps change in place: give it copies
        self.optimizer.load_state_dict(_copy(kept.optimizer))
        self.scheduler.load_state_dict(_copy(kept.scheduler))
        self.lr_cuts = self.lr_cuts + 1 if step - 1 < self.cooldown_until else 1
        self.cooldown_until = step + COOLDOWN_STEPS
        self.count += 1
        self.moved = False
        return kept.step

    # -------------------------------------------------------------- checkpoints

    def to_checkpoint(self) -> Optional[Dict[str, Any]]:
        """The checkpoint's ``rollback`` field (None with --max_rollbacks 0): the counters, and the
        kept state (a checkpoint payload) when the state saved with it is not that one."""
        if not self.enabled:
            return None
        value: Dict[str, Any] = dict(
            rollbacks=self.count, lr_cuts=self.lr_cuts, cooldown_until=self.cooldown_until, kept_step=self.kept.step
        )
        if self.moved:
            kept = self.kept
            with_average = kept.average is not None
            value["state"] = CheckpointContents(
                model_config=self.model.config.to_dict(),
                model=kept.average if with_average else kept.model,
                raw_model=kept.model if with_average else None,
                optimizer=kept.optimizer,
                scheduler=kept.scheduler,
                epoch=kept.epoch,
                step=kept.step,
            ).payload()
        return value

    def start(self, stored: Optional[StoredRollback], step: int, epoch: int) -> None:
        """Keep the state the run starts from (after ``step`` steps); when resuming, take the
        checkpoint's counters (:func:`read_stored`) and its kept state, or keep the checkpoint's
        own at the step it stores."""
        if not self.enabled:
            return
        if stored is not None:
            self.count, self.lr_cuts, self.cooldown_until = stored.rollbacks, stored.lr_cuts, stored.cooldown_until
        if stored is not None and stored.kept is not None:
            self.kept, self.moved = stored.kept, True
            return
        self.keep(step, epoch)
        if stored is not None:
            self.kept.step = stored.kept_step


@dataclass
class StoredRollback:
    """A checkpoint's ``rollback`` field, checked: the counters, the kept state's step, and the
    kept state itself when the checkpoint holds it (else it is the checkpoint's own)."""

    rollbacks: int
    lr_cuts: int
    cooldown_until: int
    kept_step: int
    kept: Optional[KeptState]


def read_stored(resumed: Optional[Checkpoint], max_rollbacks: int, ema: bool) -> Optional[StoredRollback]:
    """The ``rollback`` field of the checkpoint a run resumes from, checked before anything is
    built or written (None: not resuming, --max_rollbacks 0, or a checkpoint written without it);
    GlowflowError in one line for a malformed one. ``ema``: whether the run averages its weights."""
    value = resumed.payload.get("rollback") if resumed is not None and max_rollbacks > 0 else None
    if value is None:
        return None
    where = f"{resumed.path}: malformed training state: rollback"
    if not isinstance(value, dict) or not set(value) <= {*_COUNTERS, "state"}:
        raise GlowflowError(f"{where} must be a dict of {', '.join(_COUNTERS)} and state")
    for key in _COUNTERS:
        number = value.get(key)
        if not is_int(number) or not 0 <= number <= MAX_COUNTER:
            raise GlowflowError(f"{where} {key} must be an integer from 0 to {MAX_COUNTER}, got {number!r:.60}")
    if value["kept_step"] > resumed.step:
        raise GlowflowError(f"{where} kept_step {value['kept_step']} is beyond the checkpoint's step {resumed.step}")
    kept = _read_kept(resumed, value["state"], ema) if "state" in value else None
    if kept is not None and kept.step != value["kept_step"]:
        raise GlowflowError(f"{where} state is of step {kept.step}, not kept_step {value['kept_step']}")
    return StoredRollback(value["rollbacks"], value["lr_cuts"], value["cooldown_until"], value["kept_step"], kept)


def _read_kept(resumed: Checkpoint, state: Any, ema: bool) -> KeptState:
    """The kept state stored in ``resumed``, checked as a checkpoint of the same model and run."""
    if not isinstance(state, dict):
        raise GlowflowError(f"{resumed.path}: malformed training state: rollback state must be a dict")
    own = {key: resumed.payload.get(key) for key in ("model_config", "run_config")}
    stored = Checkpoint.from_payload(f"{resumed.path} (its rollback state)", {**state, **own})
    if not stored.has_training_state:
        raise GlowflowError(f"{stored.path} holds no optimizer state")
    stored.build_model()  # checks that the optimizer state fits the weights
    averaged = stored.averaged_weights
    if (averaged is not None) != ema:
        raise GlowflowError(f"{stored.path} does not match the run's --ema (averaged weights or not)")
    raw = stored.payload["raw_model"] if averaged is not None else stored.payload["model"]
    return KeptState(stored.step, stored.epoch, raw, averaged, stored.optimizer_state, stored.scheduler_state)


def _copy(value: Any) -> Any:
    """A copy of a state dict: its tensors cloned, its dicts and lists new, the rest shared (numbers,
    strings; a fraction of copy.deepcopy's time on the optimizer's many small tensors)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {key: _copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy(item) for item in value)
    return value
