"""Checkpoints for the commands: :func:`save_checkpoint` (what the trainer writes, as
glowflow/checkpoint_schema.py's :class:`CheckpointContents`), :class:`Checkpoint` (glowflow/reader.py's
reader, building a :class:`Glow`) and :func:`load_checkpoint`, the door for any path: a checkpoint
file, a model folder or ``pretrained:NAME``.

Writes are atomic (temporary file in the same folder, fsync, rename), so a crash never leaves a
half-written checkpoint under the final name. ``glowflow --export`` (glowflow/export.py) writes a
checkpoint's model as a model folder.
"""

from __future__ import annotations

from typing import Any

import torch

from glowflow.checkpoint_schema import CheckpointContents
from glowflow.errors import GlowflowError
from glowflow.files import atomic_write
from glowflow.model import Glow
from glowflow.pretrained import save_pretrained
from glowflow.reader import StoredCheckpoint

__all__ = [
    "Checkpoint",
    "check_image_shape",
    "from_pretrained",
    "load_checkpoint",
    "save_checkpoint",
    "save_pretrained",
]


class Checkpoint(StoredCheckpoint):
    """A checkpoint file or model folder read by glowflow/reader.py (``Checkpoint.read(path)``),
    whose model is a :class:`Glow`: ``load_model(device)`` to evaluate or sample,
    ``build_model()`` to resume training."""

    model_class = Glow


def save_checkpoint(path: str, model: Glow, **fields: Any) -> str:
    """Atomically write ``model`` (weights + config) and ``fields`` (the other keys of
    :class:`CheckpointContents`; another key is a TypeError) to ``path``."""
    contents = CheckpointContents(model_config=model.config.to_dict(), model=model.state_dict(), **fields)
    payload = contents.payload()
    return atomic_write(path, lambda handle: torch.save(payload, handle))


def load_checkpoint(path: str, map_location: Any = "cpu") -> Glow:
    """The model of a glowflow checkpoint, a model folder (config.json + model.safetensors) or
    ``pretrained:NAME``, built from it alone, on ``map_location`` in eval mode
    (``glowflow.load_checkpoint``)."""
    return Checkpoint.read(path, map_location).load_model(map_location)


from_pretrained = Glow.from_pretrained
"""``glowflow.from_pretrained(folder, device)``: :meth:`Glow.from_pretrained`."""


def check_image_shape(model: Glow, image_shape, path: str, data_name: str) -> None:
    """GlowflowError unless images of ``image_shape`` (C, H, W) from ``data_name`` fit the model."""
    if tuple(image_shape) != tuple(model.config.image_shape):
        raise GlowflowError(
            f"{path} is a model of {'x'.join(map(str, model.config.image_shape))} images, but {data_name} gives "
            f"{'x'.join(map(str, image_shape))}; use a checkpoint trained on this dataset or --image_size"
        )
