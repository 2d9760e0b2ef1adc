"""Model folders: the format in which a trained model is shared, the way the field shares models
(Hugging Face transformers and diffusers, timm): a folder holding

- ``config.json``: the :class:`GlowConfig` (architecture and data space: image shape, ``n_bits``,
  classes) as flat fields, plus ``format`` ("glowflow-pretrained"), ``format_version``,
  ``glowflow_version`` (that wrote it), ``model_type`` ("glow"), ``dataset`` (the name or path the
  model was trained on, or null) and ``image_size`` (the ``--image_size`` it was trained with, or
  null: the dataset's own);
- ``model.safetensors``: every tensor of the model's state dict, buffers included (shuffle orders,
  ActNorm's initialised flags, the fixed parts of the LU 1x1 convolution). safetensors holds
  tensors and a header of names, shapes and types, nothing else: loading it cannot run code, and
  ``torch.load`` is never called;
- ``README.md``: a short model card (data, the training command, bits/dim, date), for people.

This module owns the format: writing a folder (:func:`save_pretrained` / :func:`write_folder`, each
file atomic) and reading one (:class:`PretrainedFolder`), trusting nothing in it: ``config.json`` is
checked field by field (unknown fields, types, ranges and the model's size, through
:class:`GlowConfig`), and the safetensors header's names, shapes and kinds of number are checked
against the model before any tensor is read, then every weight's finiteness and every permutation layer's invertibility
(glowflow/invertible.py). Weights stored in float16 or bfloat16 are read as float32, with a line on
stderr saying so (glowflow computes log-determinants and inverses, which half precision cannot
carry). Each problem is a one-line :class:`GlowflowError`. It knows nothing of
:class:`glowflow.model.Glow` or of training checkpoints: glowflow/reader.py, the one reader of
stored models, reads a folder through it wherever it reads a checkpoint, and builds the model.

Writing a folder is all or nothing (:func:`glowflow.files.folder_update`: on a failure the files
it replaced are put back, what it created removed), and never into the package's own
``pretrained_models`` folder (:func:`check_not_in_package`), which only scripts/make_pretrained.py
writes (inside :func:`writing_shipped_models`). A model card's training command and bits/dim are
read back by :func:`card_provenance`, so that exporting a model folder again keeps them. Reading a
writable folder removes the temporary files that killed writers left in it
(:func:`glowflow.files.remove_stale_temporaries`).

``pretrained:NAME`` names a model folder shipped inside the package (:data:`SHIPPED`, under
glowflow/pretrained_models/), and so does a bare ``NAME`` given to ``Glow.from_pretrained`` when no
local folder of that name exists (:func:`find_folder`); an unknown name is a one-line error listing the
shipped ones (:func:`resolve`). A shipped folder holds, besides the three files above, the fitted
outlier detector of its training data (``ood_detector_<dataset>_<n_bits>bit.npz``, where
glowflow/ood/cache_path.py says the commands cache a model folder's detector, so that ``--outlier_detection`` and
``--score`` need no pass over the training set) and ``expected.json`` (the bits/dim the model
gives on a fixed slice of the test split, which the tests reproduce); scripts/make_pretrained.py
writes such a folder from a training checkpoint.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Dict, Iterator, Mapping, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from glowflow import __version__
from glowflow.config import MAX_IMAGE_SIZE, PRIOR_FIT_BEFORE_ITS_FIELD, GlowConfig
from glowflow.errors import GlowflowError
from glowflow.files import atomic_write, atomic_write_text, folder_update, note_removed, remove_stale_temporaries
from glowflow.invertible import flow_problem
from glowflow.names import PRETRAINED_PREFIX as PREFIX
from glowflow.names import SHIPPED

FORMAT = "glowflow-pretrained"
VERSION = 1
MODEL_TYPE = "glow"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
MAX_CARD_BYTES = 1 << 20
"""Largest ``README.md`` read back for its provenance (:func:`card_provenance`)."""
MAX_CONFIG_BYTES = 1 << 20
"""Largest ``config.json`` read (a real one is well under 1 KiB)."""
META_FIELDS = ("format", "format_version", "glowflow_version", "model_type", "dataset", "image_size")
"""The fields of ``config.json`` besides :class:`GlowConfig`'s."""
HALF_TYPES = {"F16": "float16", "BF16": "bfloat16"}
"""safetensors' names of the half-precision types read as float32."""


def shipped_folder(name: str) -> str:
    """The absolute path of the shipped model folder ``name`` (a key of :data:`SHIPPED`)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), SHIPPED[name])


def resolve(path: str) -> str:
    """The model folder that ``path`` names: ``pretrained:NAME`` -> a folder shipped in the package
    (GlowflowError listing the shipped names when none of that name ships), any other path unchanged."""
    if not isinstance(path, str) or not path.startswith(PREFIX):
        return path
    name = path[len(PREFIX) :]
    if name not in SHIPPED:
        available = ", ".join(sorted(SHIPPED)) or "none"
        raise GlowflowError(
            f"no pretrained model named {name!r:.60} ships with this version of glowflow ({__version__}); "
            f"available: {available}"
        )
    return shipped_folder(name)


def find_folder(name_or_path: str) -> str:
    """What ``Glow.from_pretrained(name_or_path)`` reads: a local folder of that name when there is
    one (it wins), else ``pretrained:NAME`` for a bare shipped ``NAME``, else ``name_or_path``."""
    if isinstance(name_or_path, str) and name_or_path in SHIPPED and not os.path.isdir(name_or_path):
        return PREFIX + name_or_path
    return name_or_path


def is_shipped(path: str) -> bool:
    """Whether ``path`` is a file inside a model folder shipped in the package."""
    folder = os.path.dirname(os.path.realpath(path))
    return any(folder == os.path.realpath(shipped_folder(name)) for name in SHIPPED)


_package_writes = [False]  # True inside writing_shipped_models()


def models_root() -> str:
    """The package's own folder of shipped models (glowflow/pretrained_models)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained_models")


@contextlib.contextmanager
def writing_shipped_models() -> Iterator[None]:
    """Let :func:`write_folder` write inside the package's ``pretrained_models`` folder, for the
    duration of the block: what scripts/make_pretrained.py does, and nothing else should."""
    _package_writes.append(True)
    try:
        yield
    finally:
        _package_writes.pop()


def check_not_in_package(folder: str) -> None:
    """GlowflowError when ``folder`` is, or is inside, the package's ``pretrained_models`` folder
    (a shipped model would be replaced or altered), unless inside :func:`writing_shipped_models`."""
    if _package_writes[-1]:
        return
    root = os.path.realpath(models_root())
    target = os.path.realpath(folder)
    if target == root or target.startswith(root + os.sep):
        raise GlowflowError(
            f"cannot write the model folder {folder}: it is inside glowflow's own pretrained_models folder "
            f"({root}), which holds the models shipped with the package; write it elsewhere"
        )


def is_model_folder(path: str) -> bool:
    """Whether ``path`` is a folder (or ``pretrained:NAME``): read as a model folder, not a checkpoint file."""
    return isinstance(path, str) and (path.startswith(PREFIX) or os.path.isdir(path))


# ----------------------------------------------------------------------------- writing


def config_json(config: GlowConfig, dataset: Optional[str] = None, image_size: Optional[int] = None) -> dict:
    """The content of ``config.json`` for a model of ``config`` trained on ``dataset``."""
    return {
        "format": FORMAT,
        "format_version": VERSION,
        "glowflow_version": __version__,
        "model_type": MODEL_TYPE,
        "dataset": dataset,
        "image_size": image_size,
        **config.to_dict(),
    }


def model_card(
    config: GlowConfig,
    dataset: Optional[str] = None,
    command: Optional[str] = None,
    scores: Optional[Mapping[str, float]] = None,
    date: Optional[str] = None,
    notes: Optional[str] = None,
) -> str:
    """A short model card (Markdown): the data, the architecture, the training command and the
    bits/dim (``scores``: name -> value), where known, the date, how to load the folder, and
    ``notes`` (Markdown, e.g. the other files of the folder) last."""
    c, h, w = config.image_shape
    lines = [
        f"# Glow: {dataset or 'unknown data'}",
        "",
        f"A Glow normalizing flow (Kingma & Dhariwal, 2018) written by glowflow {__version__}.",
        "",
        f"- Data: {dataset or 'not recorded'}; {c}x{h}x{w} images, {config.n_bits}-bit pixels"
        + (f", {config.num_classes} classes (class-conditional)" if config.y_condition else ""),
        f"- Architecture: K {config.K}, L {config.L}, hidden channels {config.hidden_channels}, "
        f"{config.flow_permutation} permutation{' (LU)' if config.LU_decomposed else ''}, "
        f"{config.flow_coupling} coupling{', learned top prior' if config.learn_top else ''}",
        f"- Training command: `{command}`" if command else "- Training command: not recorded",
    ]
    for name, value in (scores or {}).items():
        lines.append(f"- {name}: {value:.4f}")
    lines += [
        f"- Written: {date or datetime.date.today().isoformat()}",
        "",
        "Load it with `glowflow.Glow.from_pretrained(folder)` (or `glowflow.load_checkpoint(folder)`), or",
        "give the folder to any `--checkpoint` of the `glowflow` command. `config.json` holds the",
        "configuration, `model.safetensors` the weights (no code, read without `torch.load`).",
        "",
    ]
    if notes:
        lines += [notes.strip("\n"), ""]
    return "\n".join(lines)


def write_folder(
    folder: str,
    config: GlowConfig,
    state_dict: Mapping[str, torch.Tensor],
    dataset: Optional[str] = None,
    image_size: Optional[int] = None,
    card: Optional[str] = None,
) -> str:
    """Write the model folder ``folder`` (made if needed): ``model.safetensors`` first, then the
    card, then ``config.json``, each atomically, and the three as one (a failure puts back the
    files replaced and removes what was created: :func:`glowflow.files.folder_update`). Never into
    the package's ``pretrained_models`` (:func:`check_not_in_package`). Returns ``folder``."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise GlowflowError(f"cannot write the model folder {folder}: it is a file")
    check_not_in_package(folder)
    tensors = {name: value.detach().to("cpu").contiguous() for name, value in state_dict.items()}
    payload = safetensors_bytes(tensors, metadata={"format": FORMAT})
    text = json.dumps(config_json(config, dataset, image_size), indent=2) + "\n"
    with folder_update(folder, (WEIGHTS_NAME, CARD_NAME, CONFIG_NAME)):
        atomic_write(os.path.join(folder, WEIGHTS_NAME), lambda handle: handle.write(payload))
        atomic_write_text(os.path.join(folder, CARD_NAME), card if card is not None else model_card(config, dataset))
        atomic_write_text(os.path.join(folder, CONFIG_NAME), text)
    return folder


def save_pretrained(
    model,
    folder: str,
    dataset: Optional[str] = None,
    image_size: Optional[int] = None,
    command: Optional[str] = None,
    scores: Optional[Mapping[str, float]] = None,
    notes: Optional[str] = None,
) -> str:
    """Write ``model`` (anything with a :class:`GlowConfig` ``config`` and a ``state_dict()``: a
    Glow) as the model folder ``folder``: ``config.json`` (the configuration, and ``dataset`` /
    ``image_size`` it was trained on, if given), ``model.safetensors`` (every tensor of the state
    dict, buffers included) and a ``README.md`` model card (``command``: the training command;
    ``scores``: e.g. ``{"test bits/dim": 3.27}``; ``notes``: Markdown appended). Returns ``folder``.
    ``Glow.save_pretrained`` and ``glowflow.save_pretrained`` are this function."""
    card = model_card(model.config, dataset, command, scores, notes=notes)
    return write_folder(folder, model.config, model.state_dict(), dataset, image_size, card)


_CARD_COMMAND = re.compile(r"^- Training command: `(.{1,4096})`$")
_CARD_SCORE = re.compile(r"^- ([^:`\n]{1,200}): (-?[0-9]+\.[0-9]+)$")
_CARD_FIELDS = ("Data", "Architecture", "Training command", "Written")


def card_provenance(path: str) -> Tuple[Optional[str], Dict[str, float]]:
    """(training command, scores: name -> bits/dim) that the model card ``README.md`` of the model
    folder ``path`` states (:func:`model_card`'s lines), or (None, {}) for what it does not state
    (no card, an unreadable or edited one)."""
    command, scores = None, {}
    try:
        with open(os.path.join(resolve(path), CARD_NAME), encoding="utf-8") as handle:
            text = handle.read(MAX_CARD_BYTES)
    except (OSError, UnicodeDecodeError):
        return command, scores
    for line in text.splitlines():
        if line.startswith("- Written:"):
            break  # the scores are listed before the date
        found = _CARD_COMMAND.match(line)
        if found is not None:
            command = found.group(1)
            continue
        found = _CARD_SCORE.match(line)
        if found is not None and found.group(1) not in _CARD_FIELDS:
            scores[found.group(1)] = float(found.group(2))
    return command, scores


# ----------------------------------------------------------------------------- reading


@dataclass
class PretrainedFolder:
    """A model folder whose ``config.json`` has been read and checked (:meth:`open`); its weights
    are read by :meth:`read_weights`, against the model they are for."""

    path: str
    config: GlowConfig
    dataset: Optional[str]
    image_size: Optional[int]

    @classmethod
    def open(cls, path: str) -> PretrainedFolder:
        """Read and check ``path``/config.json; GlowflowError for a missing folder or file, bad
        JSON, another format or a newer version, an unknown field or an unusable value."""
        folder = resolve(path)
        if not os.path.isdir(folder):
            raise GlowflowError(f"model folder not found: {path}")
        if os.access(folder, os.W_OK):
            removed = remove_stale_temporaries(folder)
            if removed:
                note_removed(removed, path)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not os.path.isfile(os.path.join(folder, name)):
                raise GlowflowError(
                    f"{path} has no {name}: a model folder holds {CONFIG_NAME} and {WEIGHTS_NAME} "
                    f"(written by save_pretrained or glowflow --export)"
                )
        where = os.path.join(path, CONFIG_NAME)
        values = _read_json(os.path.join(folder, CONFIG_NAME), where)
        if values.get("format") != FORMAT:
            raise GlowflowError(f"{where} is not a glowflow model configuration (no format {FORMAT!r})")
        version = values.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise GlowflowError(f"{where}: format_version must be a positive integer, got {version!r:.60}")
        if version > VERSION:
            raise GlowflowError(f"{where} was written by a newer glowflow (format version {version})")
        unknown = sorted(k for k in values if k not in META_FIELDS and k not in GlowConfig.__dataclass_fields__)
        if unknown:
            raise GlowflowError(f"{where}: unknown field(s) {', '.join(repr(k)[:40] for k in unknown[:5])}")
        if values.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise GlowflowError(f"{where}: model_type must be {MODEL_TYPE!r}, got {values['model_type']!r:.60}")
        dataset, image_size = values.get("dataset"), values.get("image_size")
        if dataset is not None and not (isinstance(dataset, str) and 0 < len(dataset) <= 4096):
            raise GlowflowError(f"{where}: dataset must be a name or a path (text) or null, got {dataset!r:.60}")
        if image_size is not None and not (
            isinstance(image_size, int) and not isinstance(image_size, bool) and 1 <= image_size <= MAX_IMAGE_SIZE
        ):
            raise GlowflowError(
                f"{where}: image_size must be null or an integer from 1 to {MAX_IMAGE_SIZE}, got {image_size!r:.60}"
            )
        try:
            fields = {k: v for k, v in values.items() if k not in META_FIELDS}
            fields.setdefault("prior_fit", PRIOR_FIT_BEFORE_ITS_FIELD)  # a folder written before priors were fitted
            config = GlowConfig.from_dict(fields)
        except GlowflowError as err:
            raise GlowflowError(f"{where}: unusable model configuration: {err}") from None
        return cls(path=path, config=config, dataset=dataset, image_size=image_size)

    @property
    def weights_path(self) -> str:
        return os.path.join(resolve(self.path), WEIGHTS_NAME)

    def read_weights(self, expected: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The tensors of ``model.safetensors``, on the CPU, checked against ``expected`` (the state
        dict of the model they are for; a meta-device one will do): the same names, shapes and kinds
        (floating point or not) from the header before any tensor is read, then all finite and every
        permutation layer invertible. Half-precision (float16, bfloat16) tensors are returned in
        float32, with a line on stderr saying so."""
        where = os.path.join(self.path, WEIGHTS_NAME)
        try:
            with safe_open(self.weights_path, framework="pt", device="cpu") as handle:
                header = {name: handle.get_slice(name) for name in handle.keys()}
                shapes = {name: tuple(part.get_shape()) for name, part in header.items()}
                wanted = {name: tuple(t.shape) for name, t in expected.items()}
                if shapes != wanted:
                    raise GlowflowError(
                        f"{where} does not match {CONFIG_NAME} ({first_difference(shapes, wanted):.200})"
                    )
                for name, part in header.items():
                    floating = part.get_dtype() in ("F16", "BF16", "F32", "F64")
                    if floating != expected[name].is_floating_point():
                        kind = "floating-point" if expected[name].is_floating_point() else "integer"
                        raise GlowflowError(f"{where}: {name} holds {part.get_dtype()} values, the model {kind} ones")
                weights = {name: handle.get_tensor(name) for name in header}
                halves = sorted(
                    {HALF_TYPES[part.get_dtype()] for part in header.values() if part.get_dtype() in HALF_TYPES}
                )
        except GlowflowError:
            raise
        except Exception as err:  # safetensors' own error (SafetensorError) and whatever a damaged file raises
            detail = " ".join(str(err).split())[:120]
            raise GlowflowError(
                f"{where} is not a readable safetensors file: corrupt or truncated ({detail})"
            ) from None
        name = first_non_finite(weights)
        if name is not None:
            raise GlowflowError(f"{where} is corrupt: its weight {name} holds non-finite values (nan or inf)")
        if halves:
            weights = {n: t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for n, t in weights.items()}
            print(
                f"note: {where} holds {' and '.join(halves)} weights: read as float32 (glowflow computes "
                f"log-determinants and inverses, which half precision cannot carry)",
                file=sys.stderr,
            )
        problem = flow_problem(weights)
        if problem is not None:
            raise GlowflowError(f"{where} is unusable: {problem}")
        return weights


def first_non_finite(weights: Mapping[str, torch.Tensor]) -> Optional[str]:
    """The name of the first floating-point tensor of ``weights`` holding a NaN or an infinity, or None."""
    return next((n for n, t in weights.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)


def saved_dtype(weights: Mapping[str, torch.Tensor]) -> Optional[torch.dtype]:
    """The one floating-point type of ``weights`` (a model saved in float64 loads in float64, not
    rounded to float32), or None when they mix several."""
    dtypes = {t.dtype for t in weights.values() if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def _read_json(path: str, where: str) -> dict:
    """The JSON object in ``path``; GlowflowError for a file too large, not UTF-8, not JSON or not an object."""
    try:
        if os.path.getsize(path) > MAX_CONFIG_BYTES:
            raise GlowflowError(f"{where} is larger than {MAX_CONFIG_BYTES} bytes: not a model configuration")
        with open(path, encoding="utf-8") as handle:
            values = json.load(handle, parse_constant=_refuse_constant)
    except GlowflowError:
        raise
    except json.JSONDecodeError as err:
        raise GlowflowError(f"{where} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    except (OSError, UnicodeDecodeError, RecursionError) as err:
        raise GlowflowError(f"{where} cannot be read ({type(err).__name__})") from None
    except ValueError as err:  # _refuse_constant
        raise GlowflowError(f"{where} is not valid JSON ({err})") from None
    if not isinstance(values, dict):
        raise GlowflowError(f"{where} must hold a JSON object, got {type(values).__name__}")
    return values


def _refuse_constant(name: str):
    """``json.load``'s hook for NaN and Infinity, which Python accepts and JSON does not."""
    raise ValueError(f"it holds {name}, which is not a JSON number")


def first_difference(stored: Mapping[str, tuple], expected: Mapping[str, tuple]) -> str:
    """The first weight (name -> shape) that is missing, unexpected or of another shape."""
    missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if missing:
        return f"missing {missing[0]}"
    if unexpected:
        return f"unexpected {unexpected[0]}"
    name = min(n for n in stored if stored[n] != expected[n])
    return f"{name} has shape {stored[name]}, the model needs {expected[name]}"
