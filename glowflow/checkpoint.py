"""Checkpoints: one file that carries weights, configuration and training state.

A checkpoint is a ``torch.save`` of a dict holding only tensors and plain Python values
(dicts, lists, strings, numbers), so it loads with ``torch.load(weights_only=True)``: no
arbitrary object is ever unpickled. Writes are atomic (temporary file in the same folder,
fsync, rename), so a crash never leaves a half-written checkpoint under the final name.

Keys: ``format`` ("glowflow-checkpoint"), ``version``, ``model_config`` (GlowConfig as a
dict), ``run_config`` (RunConfig as a dict), ``model`` (state dict), and for training state
``optimizer``, ``scheduler``, ``epoch`` (completed epochs), ``step`` (optimizer steps),
``best_test_bpd``, ``rng`` and ``extra`` (anything else, plain values only).
"""
from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from typing import Any, Dict, Optional

import torch

from glowflow.config import GlowConfig
from glowflow.errors import GlowflowError
from glowflow.model import Glow

FORMAT = "glowflow-checkpoint"
VERSION = 1


def save_checkpoint(path: str, model: Glow, **fields: Any) -> str:
    """Atomically write ``model`` (weights + config) and ``fields`` (plain values / tensors) to ``path``."""
    payload: Dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "model_config": model.config.to_dict(),
        "model": model.state_dict(),
    }
    payload.update(fields)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def read_checkpoint(path: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """Load a glowflow checkpoint dict safely; GlowflowError for a missing, corrupt or foreign file."""
    if path is None:
        raise GlowflowError("no checkpoint given: pass --checkpoint PATH (a .pt file written by glowflow --train)")
    if not os.path.isfile(path):
        raise GlowflowError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, TypeError) as err:
        raise GlowflowError(f"{path} is not a readable glowflow checkpoint: corrupt, truncated, or holding "
                            f"objects other than tensors and plain values ({type(err).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise GlowflowError(f"{path} is not a glowflow checkpoint (no '{FORMAT}' marker); "
                            f"glowflow only loads checkpoints it wrote itself")
    if payload.get("version", 0) > VERSION:
        raise GlowflowError(f"{path} was written by a newer glowflow (checkpoint version {payload['version']})")
    return payload


def model_from_payload(payload: Dict[str, Any], path: str = "checkpoint") -> Glow:
    """Rebuild the model from a checkpoint dict's own configuration and load its weights."""
    try:
        config = GlowConfig.from_dict(payload["model_config"])
    except (KeyError, TypeError) as err:
        raise GlowflowError(f"{path} has no usable model configuration ({err})") from None
    model = Glow.from_config(config)
    try:
        model.load_state_dict(payload["model"])
    except (KeyError, RuntimeError) as err:
        raise GlowflowError(f"{path}: weights do not match the configuration stored with them "
                            f"({str(err).splitlines()[0][:200]})") from None
    return model


def load_model(path: str, map_location: Any = "cpu", image_shape: Optional[tuple] = None) -> Glow:
    """The model of checkpoint ``path``, in eval mode, built from the checkpoint alone.

    ``image_shape`` (C, H, W), if given, must match the checkpoint's: a clear error otherwise.
    """
    payload = read_checkpoint(path, map_location)
    model = model_from_payload(payload, path)
    if image_shape is not None:
        check_image_shape(model, image_shape, path, "the data")
    return model.eval()


def check_image_shape(model: Glow, image_shape, path: str, data_name: str) -> None:
    """GlowflowError unless images of ``image_shape`` (C, H, W) from ``data_name`` fit the model."""
    if tuple(image_shape) != tuple(model.config.image_shape):
        raise GlowflowError(
            f"{path} is a model of {'x'.join(map(str, model.config.image_shape))} images, but {data_name} gives "
            f"{'x'.join(map(str, image_shape))}; use a checkpoint trained on this dataset or --image_size"
        )
