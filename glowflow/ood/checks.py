"""Checking a stored outlier reference or detector before it is used: every named entry of the
right kind (a name, a number, a list of names, an array of numbers), every array finite and of a
shape that agrees with the others, every scale positive, the detector's settings of the right
types. What is wrong is said in one line (GlowflowError) naming the file and the entry: a file
that passes cannot give NaN scores or a threshold that keeps every image."""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence, Tuple

import numpy as np

from glowflow.errors import GlowflowError

DETECTOR_MAX_BYTES = 4 * 2**30
"""The most a saved detector or reference may declare in all (the class Gaussians of 200 classes
of 1024 top-latent features take 800 MiB); a larger one is refused before it is read."""


def bad(path: str, what: str) -> GlowflowError:
    """The error for a stored reference or detector at ``path`` of which ``what`` is wrong."""
    return GlowflowError(f"unusable outlier detector file {path}: {what}")


def entry(data: Mapping[str, np.ndarray], key: str, path: str) -> np.ndarray:
    """``data[key]`` (an open .npz), or a one-line error when the file lacks it."""
    if key not in data:
        raise bad(path, f"it has no {key!r}")
    return data[key]


def text(data: Mapping[str, np.ndarray], key: str, path: str) -> str:
    """The text stored under ``key`` (a 0-d string array)."""
    value = entry(data, key, path)
    if value.ndim != 0 or value.dtype.kind not in "US":
        raise bad(path, f"{key} must be one text, got a {value.dtype} array of shape {value.shape}")
    return str(value)


def number(data: Mapping[str, np.ndarray], key: str, path: str, integer: bool = False) -> float:
    """The finite number stored under ``key`` (a 0-d numeric array; an integer when ``integer``)."""
    value = entry(data, key, path)
    kinds = "iu" if integer else "iuf"
    if value.ndim != 0 or value.dtype.kind not in kinds:
        kind = "an integer" if integer else "a number"
        raise bad(path, f"{key} must be {kind}, got a {value.dtype} array of shape {value.shape}")
    result = int(value) if integer else float(value)
    if not math.isfinite(result):
        raise bad(path, f"{key} is {result}, not a finite number")
    return result


def names(data: Mapping[str, np.ndarray], key: str, path: str) -> Tuple[str, ...]:
    """The non-empty list of distinct names stored under ``key`` (a 1-d string array)."""
    value = entry(data, key, path)
    if value.ndim != 1 or value.dtype.kind not in "US" or value.size == 0:
        raise bad(path, f"{key} must be a list of names, got a {value.dtype} array of shape {value.shape}")
    result = tuple(str(s) for s in value)
    if len(set(result)) != len(result):
        raise bad(path, f"{key} names one entry twice: {list(result)}")
    return result


def array(
    data: Mapping[str, np.ndarray],
    key: str,
    path: str,
    shape: Sequence[Optional[int]],
    dtype=np.float64,
    finite: bool = True,
) -> np.ndarray:
    """The numeric array stored under ``key``, of ``shape`` (None: any size), as ``dtype``, every
    value finite (unless not ``finite``)."""
    value = entry(data, key, path)
    if value.dtype.kind not in "iuf":
        raise bad(path, f"{key} must hold numbers, got {value.dtype}")
    if value.ndim != len(shape) or any(s is not None and s != v for s, v in zip(shape, value.shape)):
        expected = "(" + ", ".join("n" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
        raise bad(path, f"{key} has shape {value.shape}, expected {expected}")
    if value.size == 0:
        raise bad(path, f"{key} is empty")
    result = np.array(value, dtype=dtype)
    if finite and not np.isfinite(result).all():
        raise bad(path, f"{key} holds {int((~np.isfinite(result)).sum())} value(s) that are not finite numbers")
    return result


def positive(values: np.ndarray, key: str, path: str) -> None:
    """Every value of ``values`` (a scale, a Cholesky factor's diagonal) above zero."""
    if not (values > 0).all():
        raise bad(path, f"{key} must be positive, got {float(values.min()):.4g} (a zero or negative scale)")


def cholesky(data: Mapping[str, np.ndarray], key: str, path: str, shape: Sequence[int], dtype=np.float64) -> np.ndarray:
    """Stacked (k, d, d) precision Cholesky factors: finite, with a positive diagonal."""
    value = array(data, key, path, shape, dtype)
    positive(np.diagonal(value, axis1=1, axis2=2), f"the diagonal of {key}", path)
    return value


SETTING_TYPES = {
    "score": str,
    "tpr": float,
    "fit_images": (int, type(None)),
    "threshold_fraction": float,
    "batch_size": int,
    "seed": int,
    "codec": (str, type(None)),
}
"""The settings a saved detector stores (JSON), each with its type."""


def settings(raw: str, path: str, codecs: Sequence[str]) -> dict:
    """The detector settings stored as JSON text ``raw``: a dict of known keys of the right types
    and ranges (the ones missing take the detector's defaults)."""
    import json

    try:
        values = json.loads(raw)
    except ValueError as err:
        raise bad(path, f"its settings are not JSON ({err})") from None
    if not isinstance(values, dict):
        raise bad(path, f"its settings must be a JSON object, got {type(values).__name__}")
    unknown = sorted(k for k in values if k not in SETTING_TYPES)
    if unknown:
        raise bad(path, f"unknown setting(s) {', '.join(repr(k)[:40] for k in unknown[:5])}")
    for key, value in values.items():
        kind = SETTING_TYPES[key]
        numeric = kind is float and isinstance(value, int)
        if isinstance(value, bool) or not (isinstance(value, kind) or numeric):
            raise bad(path, f"setting {key} has the wrong type: {value!r:.60}")
        if isinstance(value, float) and not math.isfinite(value):
            raise bad(path, f"setting {key} is {value}, not a finite number")
    if "tpr" in values and not 0.0 < values["tpr"] <= 1.0:
        raise bad(path, f"setting tpr must be in (0, 1], got {values['tpr']}")
    if "threshold_fraction" in values and not 0.0 < values["threshold_fraction"] < 1.0:
        raise bad(path, f"setting threshold_fraction must be in (0, 1), got {values['threshold_fraction']}")
    for key in ("batch_size", "fit_images"):
        if values.get(key) is not None and values[key] < 1:
            raise bad(path, f"setting {key} must be at least 1, got {values[key]}")
    if values.get("codec") is not None and values["codec"] not in codecs:
        raise bad(path, f"setting codec must be one of {', '.join(codecs)} or null, got {values['codec']!r:.40}")
    return values
