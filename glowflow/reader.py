"""The one reader of stored models: a training checkpoint (a ``torch.save`` file, schema in
glowflow/checkpoint_schema.py), a model folder (config.json + model.safetensors,
glowflow/pretrained.py) or ``pretrained:NAME`` all read as a :class:`StoredCheckpoint`, whose
accessors give the configuration, the weights, the run that wrote it and its training state, and
which builds the model. Both doors go through it: ``glowflow.load_checkpoint`` (any path) and
``Glow.from_pretrained`` (folders).

It ranks below the model and knows only its configuration: the model it builds is of
``model_class`` (given by the caller: ``Glow.from_pretrained`` passes its own class,
glowflow/checkpoint.py's ``Checkpoint`` binds :class:`glowflow.model.Glow`), built from the stored
:class:`GlowConfig` with ``model_class.from_config``.

Reading trusts nothing: a checkpoint file's zip archive checksums are verified before it is
unpickled (``weights_only=True``: no arbitrary object), and every field is checked (type, range,
size) before it is used, so a damaged or crafted file is a one-line :class:`GlowflowError`, never a
traceback, a hang or a huge allocation; that includes weights that cannot be inverted
(glowflow/invertible.py). A model folder holds no training state: its weights become ``model``
and its dataset and image size ``run_config``, and it cannot be resumed. Version 1 files keep
``n_bits`` in ``run_config``; files written before the validation split hold ``best_test_bpd``
instead of ``best_val_bpd`` / ``test_bpd_at_best``.
"""

from __future__ import annotations

import math
import os
import zipfile
import zlib
from typing import Any, Dict, Optional, Tuple

import torch

from glowflow.checkpoint_schema import BPD, COUNTER, FORMAT, MAX_COUNTER, VERSION, training_numbers
from glowflow.config import PRIOR_FIT_BEFORE_ITS_FIELD, GlowConfig, RunConfig, check_field_types, is_int, is_number
from glowflow.errors import GlowflowError
from glowflow.invertible import flow_problem
from glowflow.pretrained import PretrainedFolder, first_difference, first_non_finite, is_model_folder, saved_dtype
from glowflow.training_state import (
    optimizer_state_problem,
    rng_state_problem,
    scheduler_state_problem,
)


class StoredCheckpoint:
    """A checkpoint file or model folder read from disk, with accessors for everything the
    commands need from it, and the model it holds (of :attr:`model_class`).

    Nothing in the file is trusted: :meth:`read` checks the archive's checksums, then the model
    configuration (types, ranges, and the model's size, before any model is built), the weights
    (a dict of tensors) and the stored run configuration's types. The training state (optimizer,
    scheduler, counters, random states) is checked by :attr:`has_training_state`, when resuming.
    """

    model_class: Any = None
    """The class of the model built (``from_config(GlowConfig)``); set by a subclass or given to :meth:`read`."""

    def __init__(self, path: str, payload: Dict[str, Any], is_folder: bool = False, model_class: Any = None):
        self.path, self.payload = path, payload
        self.is_folder = is_folder
        """Whether it was read from a model folder (config.json + model.safetensors): no training state."""
        if model_class is not None:
            self.model_class = model_class
        if self.model_class is None:
            raise TypeError("a StoredCheckpoint needs the model class it builds (model_class)")

    @classmethod
    def read(cls, path: Optional[str], map_location: Any = "cpu", model_class: Any = None) -> StoredCheckpoint:
        """Read a checkpoint file, a model folder or ``pretrained:NAME`` safely; GlowflowError for
        a missing, corrupt, foreign or malformed one."""
        if path is None:
            raise GlowflowError("no checkpoint given: pass --checkpoint PATH (a .pt file written by glowflow --train)")
        if is_model_folder(path):
            return cls.read_folder(path, model_class)
        if not os.path.isfile(path):
            raise GlowflowError(f"checkpoint not found: {path}")
        _check_archive(path)
        try:
            payload = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as err:  # the weights-only unpickler fails in many ways on a crafted or damaged file
            raise GlowflowError(
                f"{path} is not a readable glowflow checkpoint: corrupt, truncated, or holding "
                f"objects other than tensors and plain values ({type(err).__name__})"
            ) from None
        return cls.from_payload(path, payload, model_class)

    @classmethod
    def from_payload(cls, path: str, payload: Any, model_class: Any = None) -> StoredCheckpoint:
        """A checkpoint's payload already in memory (read from ``path``, or nested in a checkpoint
        read from it), checked as :meth:`read` checks a file's: marker, version, configurations and
        weights; GlowflowError for a foreign or malformed one."""
        if not isinstance(payload, dict) or not (
            isinstance(payload.get("format"), str) and payload["format"] == FORMAT
        ):
            raise GlowflowError(
                f"{path} is not a glowflow checkpoint (no '{FORMAT}' marker); "
                f"glowflow only loads checkpoints it wrote itself"
            )
        version = payload.get("version", 1)
        if not is_int(version) or version < 1:
            raise GlowflowError(f"{path}: malformed checkpoint: version must be a positive integer, got {version!r}")
        if version > VERSION:
            raise GlowflowError(f"{path} was written by a newer glowflow (checkpoint version {version})")
        checkpoint = cls(path, payload, model_class=model_class)
        _ = checkpoint.model_config, checkpoint.run_config  # both checked now, before anything is built
        checkpoint._check_weights()
        return checkpoint

    @classmethod
    def read_folder(cls, path: str, model_class: Any = None) -> StoredCheckpoint:
        """A model folder (glowflow/pretrained.py) read as a checkpoint without training state: its
        configuration, its weights (checked against the model) as ``model`` and its dataset and
        image size as ``run_config``. GlowflowError for a missing or malformed folder."""
        model_class = model_class or cls.model_class
        folder = PretrainedFolder.open(path)
        with torch.device("meta"):
            expected = model_class.from_config(folder.config).state_dict()
        run_config = {"image_size": folder.image_size}
        if folder.dataset is not None:
            run_config["dataset"] = folder.dataset
        payload = {
            "format": FORMAT,
            "version": VERSION,
            "model_config": folder.config.to_dict(),
            "model": folder.read_weights(expected),
            "run_config": run_config,
        }
        return cls(path, payload, is_folder=True, model_class=model_class)

    # ------------------------------------------------------------------ the model

    @property
    def model_config(self) -> GlowConfig:
        """The model's configuration; ``n_bits`` from the run configuration in version 1 files."""
        stored = self.payload.get("model_config")
        if not isinstance(stored, dict):
            raise GlowflowError(f"{self.path} has no usable model configuration (a dict)")
        values = dict(stored)
        if "n_bits" not in values:
            values["n_bits"] = self.run_config.get("n_bits", 8)
        values.setdefault("prior_fit", PRIOR_FIT_BEFORE_ITS_FIELD)  # written before priors were fitted
        try:
            return GlowConfig.from_dict(values)
        except GlowflowError as err:
            raise GlowflowError(f"{self.path} has an unusable model configuration: {err}") from None

    def build_model(self):
        """The model rebuilt from the checkpoint's own configuration, with the weights to train on
        loaded (``raw_model`` when the run averaged its weights, else ``model``): a stored
        optimizer state must match its parameters."""
        model = self.model_class.from_config(self.model_config)
        model.load_state_dict(self.payload.get("raw_model", self.payload["model"]))
        if self.has_training_state:
            self._check_optimizer_matches(model)
        return model

    @property
    def averaged_weights(self) -> Optional[Dict[str, torch.Tensor]]:
        """The Polyak-averaged weights (the ``model`` state dict) of a run with ``--ema``, whose
        trained weights are in ``raw_model``; None for a checkpoint without ``raw_model``."""
        return self.payload["model"] if "raw_model" in self.payload else None

    def load_model(self, device: Any = "cpu"):
        """The model with its weights (``model``: the averaged ones of a run with ``--ema``) on
        ``device``, in eval mode: ready for inference. A model folder's model keeps the
        floating-point type its weights were saved in."""
        return self._model_with_weights().to(device).eval()

    def _model_with_weights(self):
        """The configuration's model with the stored weights (checked by :meth:`read`)."""
        model = self.model_class.from_config(self.model_config)
        if self.is_folder and saved_dtype(self.payload["model"]) is not None:
            model.to(saved_dtype(self.payload["model"]))  # a folder saved in float64 loads in float64
        model.load_state_dict(self.payload["model"])
        return model

    def _check_weights(self) -> None:
        """The stored weights (``model``, and ``raw_model`` when present) are dicts of finite
        tensors with exactly the names and shapes of the stored configuration's model (built on the
        meta device: no memory, no work), whose permutation layers are invertible."""
        with torch.device("meta"):
            model = self.model_class.from_config(self.model_config)
            expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        for key in ("model", "raw_model"):
            if key == "raw_model" and key not in self.payload:
                continue
            what = "weights" if key == "model" else "raw (not averaged) weights"
            weights = self.payload.get(key)
            if not isinstance(weights, dict) or not weights:
                raise GlowflowError(f"{self.path} has no model {what} (a dict of tensors)")
            for name, value in weights.items():
                if not isinstance(name, str) or not isinstance(value, torch.Tensor):
                    raise GlowflowError(
                        f"{self.path}: malformed {what}: {name!r:.60} holds {type(value).__name__}, not a tensor"
                    )
            stored = {name: tuple(t.shape) for name, t in weights.items()}
            if stored != expected:
                raise GlowflowError(
                    f"{self.path}: {what} do not match the configuration stored with them "
                    f"({first_difference(stored, expected):.200})"
                )
            name = first_non_finite(weights)
            if name is not None:
                raise GlowflowError(
                    f"{self.path} is corrupt: its {what[:-1]} {name} holds non-finite values (nan or inf)"
                )
            problem = flow_problem(weights)
            if problem is not None:
                raise GlowflowError(f"{self.path}: unusable {what}: {problem}")

    # ------------------------------------------------------------------ the run that wrote it

    @property
    def run_config(self) -> Dict[str, Any]:
        """The stored run configuration as a dict (empty when the file has none), its known
        fields' types checked; unknown keys are kept and ignored."""
        stored = self.payload.get("run_config")
        if stored is None:
            return {}
        if not isinstance(stored, dict):
            raise GlowflowError(
                f"{self.path}: malformed checkpoint: run_config must be a dict, got {type(stored).__name__}"
            )
        try:
            check_field_types(RunConfig, {k: v for k, v in stored.items() if isinstance(k, str)})
        except GlowflowError as err:
            raise GlowflowError(f"{self.path}: malformed stored run configuration: {err}") from None
        return stored

    @property
    def dataset(self) -> Optional[str]:
        """The name or path of the dataset the model was trained on, if recorded."""
        return self.run_config.get("dataset")

    @property
    def image_size(self) -> Optional[int]:
        """The ``--image_size`` the model was trained with (None: the dataset's own)."""
        return self.run_config.get("image_size")

    def validation_split(self, dataset: str) -> Optional[Tuple[int, int]]:
        """(val_size, seed) of the validation split the training run carved from ``dataset``'s
        training split (:func:`glowflow.data.split_validation` rebuilds it), or None: a model
        folder, a run without one (``--val_size 0``, or written before validation splits), or
        another dataset than the one it was trained on."""
        run = self.run_config
        val_size, seed = run.get("val_size"), run.get("seed")
        if self.is_folder or dataset != self.dataset or not isinstance(val_size, int) or val_size <= 0:
            return None
        return (val_size, seed) if isinstance(seed, int) else None

    def data_to_read(self, dataset: Optional[str], default: str) -> Tuple[str, Optional[int]]:
        """(name, image size) of the data a command reads with this model: ``dataset`` when given
        (``--dataset``), else the dataset the model was trained on, else ``default``; the stored
        ``--image_size`` applies to the model's own dataset only (another one keeps its size)."""
        name = dataset or self.dataset or default
        return name, (self.image_size if name == self.dataset else None)

    # ------------------------------------------------------------------ resuming

    @property
    def has_training_state(self) -> bool:
        """Whether the file can be resumed from (it holds an optimizer state and a run
        configuration); GlowflowError when that state is malformed."""
        if "optimizer" not in self.payload or "run_config" not in self.payload:
            return False
        self._check_training_state()
        return True

    @property
    def epoch(self) -> int:
        """Completed epochs."""
        return self._counter("epoch")

    @property
    def step(self) -> int:
        """Optimizer steps taken."""
        return self._counter("step")

    @property
    def nonfinite_steps(self) -> int:
        """Steps skipped for a non-finite loss or gradient, over the whole run."""
        return self._counter("nonfinite_steps", 0)

    @property
    def nonfinite_in_a_row(self) -> int:
        """Steps skipped in a row at the end of the run so far (the divergence guard's count)."""
        return self._counter("nonfinite_in_a_row", 0)

    @property
    def best_val_bpd(self) -> float:
        """The validation bits/dim of the best checkpoint so far (inf before the first evaluation,
        without a validation split, and in files written before there was one)."""
        return self._bpd("best_val_bpd")

    @property
    def best_test_bpd(self) -> float:
        """The test bits/dim of the best checkpoint so far, reported only (inf before the first
        evaluation): ``test_bpd_at_best``, or in files written before the validation split
        ``best_test_bpd``, the test bits/dim that then chose it."""
        return self._bpd("best_test_bpd" if "best_test_bpd" in self.payload else "test_bpd_at_best")

    def _bpd(self, key: str) -> float:
        value = self.payload.get(key, math.inf)
        if not is_number(value) or math.isnan(value):
            raise GlowflowError(f"{self.path}: malformed training state: {key} must be a number, got {value!r:.60}")
        return float(value)

    @property
    def optimizer_state(self) -> Dict[str, Any]:
        """The optimizer's state dict (Adamax), its structure and types checked."""
        state = self.payload.get("optimizer")
        problem = optimizer_state_problem(state)
        if problem:
            raise GlowflowError(f"{self.path}: malformed training state: optimizer {problem}")
        return state

    @property
    def scheduler_state(self) -> Dict[str, Any]:
        """The learning-rate scheduler's state dict (LambdaLR), its keys and types checked."""
        state = self.payload.get("scheduler")
        problem = scheduler_state_problem(state)
        if problem:
            raise GlowflowError(f"{self.path}: malformed training state: scheduler {problem}")
        return state

    @property
    def rng_state(self) -> Dict[str, Any]:
        """The random number generators' states: ``torch`` (the CPU generator's) and ``cuda`` (a
        list, one per GPU), each optional."""
        rng = self.payload.get("rng", {})
        problem = rng_state_problem(rng)
        if problem:
            raise GlowflowError(f"{self.path}: malformed training state: rng {problem}")
        return rng

    def _counter(self, key: str, default: Optional[int] = None) -> int:
        value = self.payload.get(key, default)
        if not is_int(value) or not 0 <= value <= MAX_COUNTER:
            raise GlowflowError(
                f"{self.path}: malformed training state: {key} must be an integer from 0 to {MAX_COUNTER}, "
                f"got {value!r:.60}"
            )
        return int(value)

    def _check_training_state(self) -> None:
        try:
            RunConfig.from_dict(self.run_config)
        except GlowflowError as err:
            raise GlowflowError(f"{self.path}: unusable stored run configuration: {err}") from None
        for key, default in training_numbers(COUNTER):  # the schema's counters and bits/dim, each checked
            self._counter(key, default)
        for key, _ in training_numbers(BPD):
            self._bpd(key)
        _ = self.optimizer_state, self.scheduler_state, self.rng_state
        if len(self.scheduler_state.get("base_lrs", [])) != len(self.optimizer_state["param_groups"]):
            raise GlowflowError(
                f"{self.path}: malformed training state: the scheduler and the optimizer have different "
                f"numbers of parameter groups"
            )

    def _check_optimizer_matches(self, model) -> None:
        """The stored optimizer state belongs to ``model``'s parameters: as many, of the same shapes."""
        params = list(model.parameters())
        state = self.optimizer_state
        indices = [i for group in state["param_groups"] for i in group["params"]]
        if sorted(indices) != list(range(len(params))):
            raise GlowflowError(
                f"{self.path}: the stored optimizer state is for {len(indices)} parameters, the model has {len(params)}"
            )
        for index, values in state["state"].items():
            for key, value in values.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != params[index].shape:
                    raise GlowflowError(
                        f"{self.path}: the stored optimizer state {key} of parameter {index} has shape "
                        f"{tuple(value.shape)}, the parameter {tuple(params[index].shape)}"
                    )


def _check_archive(path: str) -> None:
    """GlowflowError unless ``path`` is a zip archive (what ``torch.save`` writes) whose every part
    matches its stored CRC-32 checksum: a damaged file is refused before it is unpickled."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except zipfile.BadZipFile:
        raise GlowflowError(
            f"{path} is not a readable glowflow checkpoint: not a file written by torch.save (no zip archive)"
        ) from None
    except (OSError, EOFError, ValueError, RuntimeError, NotImplementedError, zlib.error) as err:
        raise GlowflowError(f"{path} is corrupt: its archive cannot be read ({type(err).__name__})") from None
    if damaged is not None:
        raise GlowflowError(
            f"{path} is corrupt: its part {damaged!r} does not match its checksum (damaged on disk or in "
            f"transfer); use another copy"
        )


def _is_text(value: Any, text: str) -> bool:
    return isinstance(value, str) and value == text
