"""Checkpoints: the only code that knows their schema (writing, reading, rebuilding the model).

A checkpoint is one ``torch.save`` file of a dict holding only tensors and plain Python values
(dicts, lists, strings, numbers), so it loads with ``torch.load(weights_only=True)``: no arbitrary
object is ever unpickled. Writes are atomic (temporary file in the same folder, fsync, rename), so
a crash never leaves a half-written checkpoint under the final name.

Keys: ``format`` ("glowflow-checkpoint"), ``version``, ``model_config`` (:class:`GlowConfig` as a
dict: architecture, image shape and ``n_bits``), ``model`` (state dict: the weights to evaluate and
sample with, Polyak-averaged when the run had ``--ema``), ``raw_model`` (with ``--ema`` only: the
trained weights themselves, which a resumed run continues from), and for training state
``run_config`` (:class:`RunConfig` as a dict, with the validation split's size ``val_size`` and the
``seed`` that drew it), ``optimizer``, ``scheduler``, ``epoch`` (completed epochs), ``step``
(optimizer steps), ``best_val_bpd`` (the validation bits/dim that chose the best checkpoint; inf
without a validation split), ``test_bpd_at_best`` (the chosen checkpoint's test bits/dim, reported
only), ``nonfinite_steps``, ``nonfinite_in_a_row`` (the divergence guard's count of steps skipped
in a row) and ``rng``.
Version 1 files (before ``n_bits`` joined the model configuration) keep it in ``run_config``;
:attr:`Checkpoint.model_config` reads both. Files written before the validation split hold
``best_test_bpd`` (the best checkpoint was then chosen on the test split) instead of the last two:
:attr:`Checkpoint.best_test_bpd` reads either, :attr:`Checkpoint.best_val_bpd` is inf for them.

A model folder (config.json + model.safetensors, glowflow/pretrained.py) is read wherever a
checkpoint is (:meth:`Checkpoint.read` with a folder or ``pretrained:NAME``): its weights become
``model`` and its dataset and image size ``run_config``; it holds no training state, so it cannot
be resumed. glowflow/export.py (``glowflow --export``) writes a checkpoint's model as such a folder.

Reading trusts nothing in the file (:class:`Checkpoint`): the zip archive's CRC-32 checksums are
verified before unpickling, and every field is checked (type, range, size) before it is used, so
a damaged or crafted file is a one-line :class:`GlowflowError`, never a traceback, a hang or a
huge allocation; that includes weights that cannot be inverted (glowflow/invertible.py).
"""

from __future__ import annotations

import math
import os
import zipfile
import zlib
from typing import Any, Dict, Optional, Tuple

import torch

from glowflow.config import GlowConfig, RunConfig, check_field_types, is_int, is_number
from glowflow.errors import GlowflowError
from glowflow.files import atomic_write
from glowflow.invertible import flow_problem
from glowflow.model import Glow
from glowflow.pretrained import PretrainedFolder, first_difference, first_non_finite, is_model_folder, saved_dtype

FORMAT = "glowflow-checkpoint"
VERSION = 2
MAX_COUNTER = 2**62
"""Largest epoch or step count a checkpoint may hold."""


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
    """A checkpoint read from disk, with accessors for everything the commands need from it.

    Nothing in the file is trusted: :meth:`read` checks the archive's checksums, then the model
    configuration (types, ranges, and the model's size, before any model is built), the weights
    (a dict of tensors) and the stored run configuration's types. The training state (optimizer,
    scheduler, counters, random states) is checked by :attr:`has_training_state`, when resuming.
    """

    def __init__(self, path: str, payload: Dict[str, Any], is_folder: bool = False):
        self.path, self.payload = path, payload
        self.is_folder = is_folder
        """Whether it was read from a model folder (config.json + model.safetensors): no training state."""

    @classmethod
    def read(cls, path: Optional[str], map_location: Any = "cpu") -> Checkpoint:
        """Load a glowflow checkpoint safely; GlowflowError for a missing, corrupt, foreign or
        malformed file."""
        if path is None:
            raise GlowflowError("no checkpoint given: pass --checkpoint PATH (a .pt file written by glowflow --train)")
        if is_model_folder(path):
            return cls._read_folder(path)
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
        if not isinstance(payload, dict) or not _is_text(payload.get("format"), FORMAT):
            raise GlowflowError(
                f"{path} is not a glowflow checkpoint (no '{FORMAT}' marker); "
                f"glowflow only loads checkpoints it wrote itself"
            )
        version = payload.get("version", 1)
        if not is_int(version) or version < 1:
            raise GlowflowError(f"{path}: malformed checkpoint: version must be a positive integer, got {version!r}")
        if version > VERSION:
            raise GlowflowError(f"{path} was written by a newer glowflow (checkpoint version {version})")
        checkpoint = cls(path, payload)
        _ = checkpoint.model_config, checkpoint.run_config  # both checked now, before anything is built
        checkpoint._check_weights()
        return checkpoint

    @classmethod
    def _read_folder(cls, path: str) -> Checkpoint:
        """A model folder (glowflow/pretrained.py) read as a checkpoint without training state: its
        configuration, its weights as ``model`` and its dataset and image size as ``run_config``."""
        folder = PretrainedFolder.open(path)
        with torch.device("meta"):
            expected = Glow.from_config(folder.config).state_dict()
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
        return cls(path, payload, is_folder=True)

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
        try:
            return GlowConfig.from_dict(values)
        except GlowflowError as err:
            raise GlowflowError(f"{self.path} has an unusable model configuration: {err}") from None

    def build_model(self) -> Glow:
        """The model rebuilt from the checkpoint's own configuration, with the weights to train on
        loaded (``raw_model`` when the run averaged its weights, else ``model``): a stored
        optimizer state must match its parameters."""
        model = Glow.from_config(self.model_config)
        model.load_state_dict(self.payload.get("raw_model", self.payload["model"]))
        if self.has_training_state:
            self._check_optimizer_matches(model)
        return model

    @property
    def averaged_weights(self) -> Optional[Dict[str, torch.Tensor]]:
        """The Polyak-averaged weights (the ``model`` state dict) of a run with ``--ema``, whose
        trained weights are in ``raw_model``; None for a checkpoint without ``raw_model``."""
        return self.payload["model"] if "raw_model" in self.payload else None

    def load_model(self, device: Any = "cpu") -> Glow:
        """The model with its weights on ``device``, in eval mode: ready for inference."""
        return self._model_with_weights().to(device).eval()

    def _model_with_weights(self) -> Glow:
        """The configuration's model with the stored weights (checked by :meth:`read`)."""
        model = Glow.from_config(self.model_config)
        if self.is_folder and saved_dtype(self.payload["model"]) is not None:
            model.to(saved_dtype(self.payload["model"]))  # as Glow.from_pretrained loads it
        model.load_state_dict(self.payload["model"])
        return model

    def _check_weights(self) -> None:
        """The stored weights (``model``, and ``raw_model`` when present) are dicts of finite
        tensors with exactly the names and shapes of the stored configuration's model (built on the
        meta device: no memory, no work), whose permutation layers are invertible."""
        with torch.device("meta"):
            expected = {name: tuple(t.shape) for name, t in Glow.from_config(self.model_config).state_dict().items()}
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
        problem = _optimizer_state_problem(state)
        if problem:
            raise GlowflowError(f"{self.path}: malformed training state: optimizer {problem}")
        return state

    @property
    def scheduler_state(self) -> Dict[str, Any]:
        """The learning-rate scheduler's state dict (LambdaLR), its keys and types checked."""
        state = self.payload.get("scheduler")
        problem = _scheduler_state_problem(state)
        if problem:
            raise GlowflowError(f"{self.path}: malformed training state: scheduler {problem}")
        return state

    @property
    def rng_state(self) -> Dict[str, Any]:
        """The random number generators' states: ``torch`` (the CPU generator's) and ``cuda`` (a
        list, one per GPU), each optional."""
        rng = self.payload.get("rng", {})
        problem = _rng_state_problem(rng)
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
        _ = self.epoch, self.step, self.nonfinite_steps, self.best_val_bpd, self.best_test_bpd  # each checks its field
        _ = self.optimizer_state, self.scheduler_state, self.rng_state
        if len(self.scheduler_state.get("base_lrs", [])) != len(self.optimizer_state["param_groups"]):
            raise GlowflowError(
                f"{self.path}: malformed training state: the scheduler and the optimizer have different "
                f"numbers of parameter groups"
            )

    def _check_optimizer_matches(self, model: Glow) -> None:
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


def load_checkpoint(path: str, map_location: Any = "cpu") -> Glow:
    """Rebuild a model from a glowflow checkpoint alone, or from a model folder (config.json +
    model.safetensors), in eval mode (``glowflow.load_checkpoint``)."""
    return load_model(path, map_location=map_location)


def from_pretrained(folder: str, device: Any = "cpu") -> Glow:
    """The model of a model folder, in eval mode (``glowflow.from_pretrained``; :meth:`Glow.from_pretrained`)."""
    return Glow.from_pretrained(folder, device)


def save_pretrained(model: Glow, folder: str, **card: Any) -> str:
    """Write ``model`` as a model folder (``glowflow.save_pretrained``; :meth:`Glow.save_pretrained`,
    whose keywords ``card`` takes)."""
    return model.save_pretrained(folder, **card)


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


# ----------------------------------------------------------------------------- checking a file


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


_GROUP_NUMBERS = ("lr", "eps", "weight_decay", "initial_lr")
_SCALARS = (bool, int, float, str, type(None))


def _optimizer_state_problem(state: Any) -> Optional[str]:
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


def _scheduler_state_problem(state: Any) -> Optional[str]:
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


def _rng_state_problem(rng: Any) -> Optional[str]:
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
