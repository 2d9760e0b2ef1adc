"""The training state a checkpoint holds for resuming, checked before it is used: the optimizer's
state dict (Adamax), the learning-rate scheduler's (LambdaLR) and the random number generators'.
Each check returns what is wrong (a phrase for a one-line error) or None; glowflow/reader.py
raises it. Nothing here builds an optimizer from the file.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from glowflow.config import is_int, is_number

_GROUP_NUMBERS = ("lr", "eps", "weight_decay", "initial_lr")
_SCALARS = (bool, int, float, str, type(None))


def optimizer_state_problem(state: Any) -> Optional[str]:
    """What is wrong with an optimizer state dict, or None."""
    if not isinstance(state, dict) or not isinstance(state.get("state"), dict):
        return "must be a dict with a 'state' dict"
    groups = state.get("param_groups")
    if not isinstance(groups, list) or not groups or not all(isinstance(g, dict) for g in groups):
        return "must have a list of parameter groups (dicts)"
    indices = []
    for group in groups:
        params = group.get("params")
        if not isinstance(params, list) or not all(is_int(i) and i >= 0 for i in params):
            return "parameter group 'params' must be a list of parameter numbers"
        indices += params
        for key, value in group.items():
            if key == "params":
                continue
            if key in _GROUP_NUMBERS:
                ok = is_number(value) and math.isfinite(value) and value >= 0
            elif key == "betas":
                ok = isinstance(value, (list, tuple)) and len(value) == 2
                ok = ok and all(is_number(b) and 0 <= b < 1 for b in value)
            else:
                ok = isinstance(key, str) and isinstance(value, _SCALARS)
            if not ok:
                return f"parameter group field {key!r:.40} has an unusable value {value!r:.60}"
    if len(set(indices)) != len(indices):
        return "lists a parameter twice"
    for index, values in state["state"].items():
        if index not in indices or not isinstance(values, dict):
            return f"holds a state for an unknown parameter {index!r:.40}"
        for key, value in values.items():
            if not isinstance(key, str) or not isinstance(value, (torch.Tensor, int, float)) or isinstance(value, bool):
                return f"state {key!r:.40} of parameter {index} is not a tensor or a number"
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                return f"state {key} of parameter {index} holds non-finite values"
    return None


def _scheduler_keys() -> set:
    """The keys of a LambdaLR state dict in this torch (and 'verbose', of older ones)."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    return set(torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0).state_dict()) | {"verbose"}


def scheduler_state_problem(state: Any) -> Optional[str]:
    """What is wrong with a LambdaLR state dict, or None (its keys become the scheduler's attributes)."""
    if not isinstance(state, dict):
        return "must be a dict"
    unknown = [k for k in state if k not in _scheduler_keys()]
    if unknown:
        return f"has unexpected fields {sorted(map(str, unknown))!r:.80}"
    for key, value in state.items():
        if key in ("last_epoch", "_step_count"):
            ok = is_int(value)
        elif key in ("base_lrs", "_last_lr"):
            ok = isinstance(value, list) and all(is_number(v) and math.isfinite(v) for v in value)
        elif key == "lr_lambdas":
            ok = isinstance(value, list) and all(v is None or isinstance(v, dict) for v in value)
        else:
            ok = isinstance(value, bool)
        if not ok:
            return f"field {key} has an unusable value {value!r:.60}"
    if "base_lrs" not in state or "last_epoch" not in state:
        return "lacks base_lrs or last_epoch"
    return None


def rng_state_problem(rng: Any) -> Optional[str]:
    """What is wrong with the stored random number generator states, or None."""
    if not isinstance(rng, dict):
        return "must be a dict"
    cpu = rng.get("torch")
    if cpu is not None and not (_is_byte_state(cpu) and cpu.numel() == torch.get_rng_state().numel()):
        return "state 'torch' is not a CPU generator state"
    cuda = rng.get("cuda")
    if cuda is not None and not (isinstance(cuda, list) and all(_is_byte_state(s) for s in cuda)):
        return "state 'cuda' is not a list of GPU generator states"
    return None


def _is_byte_state(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1
