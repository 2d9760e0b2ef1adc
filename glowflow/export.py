"""``glowflow --export FOLDER --checkpoint PATH``: the model of a training checkpoint, or of a model
folder, written as a model folder (glowflow/pretrained.py) with a model card that keeps its
provenance: the training command and bits/dim, rebuilt from a checkpoint's stored run or carried
over from a model folder's own card.

The folder is written as a whole (a failure, a full disk, leaves what was there before and removes
what the export created) and never into the package's own ``pretrained_models`` folder.
"""

from __future__ import annotations

import math

from glowflow.checkpoint import Checkpoint
from glowflow.config import training_command
from glowflow.files import check_writable_folder
from glowflow.pretrained import card_provenance, check_not_in_package


def export_checkpoint(path: str, folder: str) -> str:
    """The model of checkpoint ``path`` (its ``model`` weights: the averaged ones of a run with
    ``--ema``) or of the model folder ``path`` written as the model folder ``folder`` (which may be
    ``path`` itself). The card states the dataset, and the training command and bits/dim: for a
    checkpoint the command rebuilt from the stored flags and its best validation bits/dim and the
    test bits/dim there, when recorded; for a model folder those its own card states. Returns ``folder``."""
    check_not_in_package(folder)
    check_writable_folder(folder)
    checkpoint = Checkpoint.read(path)
    model = checkpoint.load_model()
    if checkpoint.is_folder:
        command, scores = card_provenance(path)
    else:
        command = training_command(checkpoint.run_config, model.config)
        scores = {}
        if math.isfinite(checkpoint.best_val_bpd):
            scores["best validation bits/dim"] = checkpoint.best_val_bpd
        if math.isfinite(checkpoint.best_test_bpd):
            scores["test bits/dim at the best validation" if scores else "test bits/dim"] = checkpoint.best_test_bpd
    return model.save_pretrained(folder, checkpoint.dataset, checkpoint.image_size, command, scores)
