"""Strict field types of the configuration dataclasses: a value read from a flag, a checkpoint or a
model folder has exactly the type its field declares (a bool is a bool, an int an int and never a
bool or a float), else a one-line :class:`GlowflowError` names the field."""

from __future__ import annotations

import numbers
import typing
from typing import Any, Dict, Optional, Union

from glowflow.errors import GlowflowError


def check_field_types(config: Any, values: Dict[str, Any]) -> None:
    """GlowflowError naming the first field of ``values`` whose value does not have the type the
    dataclass ``config`` (a class or an instance) declares. Tuples may be given as lists."""
    hints = typing.get_type_hints(config if isinstance(config, type) else type(config))
    for name, value in values.items():
        hint = hints.get(name)
        if hint is not None and typing.get_origin(hint) is not typing.ClassVar and not _has_type(value, hint):
            shown = repr(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise GlowflowError(f"{name} must be {_describe(hint)}, got {shown}")


def is_int(value: Any) -> bool:
    """An integer that is not a bool (Python's or numpy's)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A real number that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int_range(name: str, value: Optional[int], low: int, high: Optional[int]) -> None:
    """GlowflowError unless ``value`` (None: nothing to check) is in ``low..high`` (None: unbounded)."""
    if value is None:
        return
    if value < low:
        raise GlowflowError(f"{name} must be {'non-negative' if low == 0 else f'at least {low}'}, got {value}")
    if high is not None and value > high:
        raise GlowflowError(f"{name} must be at most {high}, got {value}")


def _has_type(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        return any(_has_type(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return is_int(value)
    if hint is float:
        return is_number(value)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_has_type(v, args[0]) for v in value)
        return len(value) == len(args) and all(_has_type(v, a) for v, a in zip(value, args))
    raise TypeError(f"check_field_types does not know the type {hint}")


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        return " or ".join(_describe(arg) for arg in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0]).split(' ', 1)[1]}s"
        return f"a list of {len(args)} {_describe(args[0]).split(' ', 1)[1]}s"
    names = {type(None): "none", bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names[hint]
