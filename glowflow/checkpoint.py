"""Checkpoints: the only code that knows their schema (writing, reading, rebuilding the model).

A checkpoint is one ``torch.save`` file of a dict holding only tensors and plain Python values
(dicts, lists, strings, numbers), so it loads with ``torch.load(weights_only=True)``: no arbitrary
object is ever unpickled. Writes are atomic (temporary file in the same folder, fsync, rename), so
a crash never leaves a half-written checkpoint under the final name.

Keys: ``format`` ("glowflow-checkpoint"), ``version``, ``model_config`` (:class:`GlowConfig` as a
dict: architecture, image shape and ``n_bits``), ``model`` (state dict), and for training state
``run_config`` (:class:`RunConfig` as a dict), ``optimizer``, ``scheduler``, ``epoch`` (completed
epochs), ``step`` (optimizer steps), ``best_test_bpd``, ``nonfinite_steps`` and ``rng``.
Version 1 files (before ``n_bits`` joined the model configuration) keep it in ``run_config``;
:attr:`Checkpoint.model_config` reads both.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from typing import Any, Dict, Optional

import torch

from glowflow.config import GlowConfig
from glowflow.errors import GlowflowError
from glowflow.files import atomic_write
from glowflow.model import Glow

FORMAT = "glowflow-checkpoint"
VERSION = 2


def save_checkpoint(path: str, model: Glow, **fields: Any) -> str:
    """Atomically write ``model`` (weights + config) and ``fields`` (plain values / tensors) to ``path``."""
    payload: Dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "model_config": model.config.to_dict(),
        "model": model.state_dict(),
    }
    payload.update(fields)
    return atomic_write(path, lambda handle: torch.save(payload, handle))


class Checkpoint:
    """A checkpoint read from disk, with accessors for everything the commands need from it."""

    def __init__(self, path: str, payload: Dict[str, Any]):
        self.path, self.payload = path, payload

    @classmethod
    def read(cls, path: Optional[str], map_location: Any = "cpu") -> Checkpoint:
        """Load a glowflow checkpoint safely; GlowflowError for a missing, corrupt or foreign file."""
        if path is None:
            raise GlowflowError("no checkpoint given: pass --checkpoint PATH (a .pt file written by glowflow --train)")
        if not os.path.isfile(path):
            raise GlowflowError(f"checkpoint not found: {path}")
        try:
            payload = torch.load(path, map_location=map_location, weights_only=True)
        except (
            pickle.UnpicklingError,
            RuntimeError,
            EOFError,
            zipfile.BadZipFile,
            OSError,
            ValueError,
            TypeError,
        ) as err:
            raise GlowflowError(
                f"{path} is not a readable glowflow checkpoint: corrupt, truncated, or holding "
                f"objects other than tensors and plain values ({type(err).__name__})"
            ) from None
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise GlowflowError(
                f"{path} is not a glowflow checkpoint (no '{FORMAT}' marker); "
                f"glowflow only loads checkpoints it wrote itself"
            )
        if payload.get("version", 0) > VERSION:
            raise GlowflowError(f"{path} was written by a newer glowflow (checkpoint version {payload['version']})")
        return cls(path, payload)

    # ------------------------------------------------------------------ the model

    @property
    def model_config(self) -> GlowConfig:
        """The model's configuration; ``n_bits`` from the run configuration in version 1 files."""
        stored = self.payload.get("model_config")
        if not isinstance(stored, dict):
            raise GlowflowError(f"{self.path} has no usable model configuration")
        values = dict(stored)
        if "n_bits" not in values:
            values["n_bits"] = int(self.run_config.get("n_bits", 8))
        try:
            return GlowConfig.from_dict(values)
        except (KeyError, TypeError) as err:
            raise GlowflowError(f"{self.path} has no usable model configuration ({err})") from None

    def build_model(self) -> Glow:
        """The model rebuilt from the checkpoint's own configuration, with its weights loaded."""
        model = Glow.from_config(self.model_config)
        try:
            model.load_state_dict(self.payload["model"])
        except (KeyError, RuntimeError) as err:
            raise GlowflowError(
                f"{self.path}: weights do not match the configuration stored with them "
                f"({str(err).splitlines()[0][:200]})"
            ) from None
        return model

    def load_model(self, device: Any = "cpu") -> Glow:
        """:meth:`build_model` on ``device``, in eval mode: ready for inference."""
        return self.build_model().to(device).eval()

    # ------------------------------------------------------------------ the run that wrote it

    @property
    def run_config(self) -> Dict[str, Any]:
        """The stored run configuration as a dict (empty when the file has none)."""
        stored = self.payload.get("run_config")
        return stored if isinstance(stored, dict) else {}

    @property
    def dataset(self) -> Optional[str]:
        """The name or path of the dataset the model was trained on, if recorded."""
        return self.run_config.get("dataset")

    @property
    def image_size(self) -> Optional[int]:
        """The ``--image_size`` the model was trained with (None: the dataset's own)."""
        return self.run_config.get("image_size")

    @property
    def has_training_state(self) -> bool:
        return "optimizer" in self.payload and "run_config" in self.payload


def load_model(path: str, map_location: Any = "cpu", image_shape: Optional[tuple] = None) -> Glow:
    """The model of checkpoint ``path``, in eval mode, built from the checkpoint alone.

    ``image_shape`` (C, H, W), if given, must match the checkpoint's: a clear error otherwise.
    """
    model = Checkpoint.read(path, map_location).load_model(map_location)
    if image_shape is not None:
        check_image_shape(model, image_shape, path, "the data")
    return model


def check_image_shape(model: Glow, image_shape, path: str, data_name: str) -> None:
    """GlowflowError unless images of ``image_shape`` (C, H, W) from ``data_name`` fit the model."""
    if tuple(image_shape) != tuple(model.config.image_shape):
        raise GlowflowError(
            f"{path} is a model of {'x'.join(map(str, model.config.image_shape))} images, but {data_name} gives "
            f"{'x'.join(map(str, image_shape))}; use a checkpoint trained on this dataset or --image_size"
        )
